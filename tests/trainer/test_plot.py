"""arpo.trainer.plot: PNG curves from metrics.jsonl, single run and overlaid runs."""
import math
import os

import pytest

from arpo.trainer.metrics import MetricsLogger

pytest.importorskip("matplotlib")
from arpo.trainer.plot import _label, plot_run, smooth  # noqa: E402


def _fake_run(run_dir, algo="arpo", steps=30, branch=True):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"algo:\n  name: {algo}\n")
    with MetricsLogger(run_dir) as log:
        for s in range(1, steps + 1):
            m = {"reward": 0.1 * s ** 0.5, "accuracy": min(1.0, 0.02 * s), "entropy": math.exp(-s / 20),
                 "tool_calls_per_leaf": 1 + 1 / s, "tokens_per_s": 1000.0 + s, "loss": 0.01 * (-1) ** s,
                 "time/rollout": 2.0, "time/tools": 1.0, "time/update": 0.5}
            if branch:
                m["branch_rate"] = 0.3
            log.log(s, m)
            if s % 10 == 0:
                log.log(s, {"eval/accuracy": 0.01 * s})
    return run_dir


def _assert_png(path):
    import matplotlib.image as mpimg

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.02  # not a blank canvas


def test_single_run_pngs(tmp_path):
    run = _fake_run(str(tmp_path / "arpo-run"))
    paths = plot_run(run)
    names = {os.path.basename(p) for p in paths}
    assert {"reward.png", "accuracy.png", "eval_accuracy.png", "entropy.png", "tool_calls.png", "branch_rate.png",
            "tokens_per_s.png", "time.png", "overview.png"} <= names
    assert "grad_norm.png" not in names  # never logged: no empty plot
    for p in paths:
        assert os.path.dirname(p) == os.path.join(run, "plots")
        _assert_png(p)


def test_overlay_of_two_runs(tmp_path):
    a = _fake_run(str(tmp_path / "a"), "arpo")
    b = _fake_run(str(tmp_path / "b"), "grpo", steps=20, branch=False)
    paths = plot_run([a, b])
    assert paths and all(os.path.dirname(p) == os.path.join(a, "plots", "compare") for p in paths)
    assert "overview.png" in {os.path.basename(p) for p in paths}
    for p in paths:
        _assert_png(p)
    out = plot_run([a, b], out_dir=str(tmp_path / "cmp"), labels=["ARPO", "GRPO"])
    assert all(p.startswith(str(tmp_path / "cmp")) for p in out)


def test_errors_and_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(str(tmp_path))
    with pytest.raises(ValueError):
        plot_run([])
    assert _label(_fake_run(str(tmp_path / "baseline"), "grpo", steps=2)) == "baseline (grpo)"
    assert _label(_fake_run(str(tmp_path / "grpo-seed1"), "grpo", steps=2)) == "grpo-seed1"


def test_smooth():
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50)
    values = [float(i % 7) for i in range(40)]
    out = smooth(values, span=3)
    assert out[0] == values[0]
    a, avg, norm = 0.5, 0.0, 0.0
    for v, got in zip(values, out):
        avg, norm = (1 - a) * avg + a * v, (1 - a) * norm + a
        assert got == pytest.approx(avg / norm)
    assert smooth(values, span=1) == pytest.approx(values)
