"""arpo.trainer.metrics: JSONL lines, truncation on resume, optional TensorBoard / W&B sinks, progress postfix."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from arpo.trainer.metrics import METRICS_FILE, MetricsLogger, progress_postfix, read_metrics, truncate_metrics


def _lines(run_dir):
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_one_flushed_line_per_call(tmp_path):
    run = str(tmp_path)
    log = MetricsLogger(run)
    log.log(1, {"reward": torch.tensor(0.25), "accuracy": np.float32(0.5), "leaves": 16, "ok": True})
    rows = _lines(run)  # readable before close: flushed
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("step", "reward", "accuracy", "leaves", "ok")} == \
        {"step": 1, "reward": 0.25, "accuracy": 0.5, "leaves": 16, "ok": 1}
    log.log(2, {"reward": float("nan"), "entropy": math.inf})
    log.close()
    assert _lines(run)[1]["reward"] is None and _lines(run)[1]["entropy"] is None
    assert read_metrics(run) == _lines(run)


def test_bad_metrics_rejected(tmp_path):
    with MetricsLogger(str(tmp_path)) as log:
        with pytest.raises(ValueError, match="not a number"):
            log.log(1, {"reward": "high"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})


def test_resume_truncates_lines_after_the_checkpoint(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        for step in range(0, 6):
            log.log(step, {"reward": step / 10})
            if step % 2 == 0:
                log.log(step, {"eval/accuracy": step / 20})
    with MetricsLogger(run, resume_step=3) as log:
        assert [r["step"] for r in _lines(run)] == [0, 0, 1, 2, 2, 3]
        log.log(4, {"reward": 0.99})
    rows = _lines(run)
    assert [r["step"] for r in rows] == [0, 0, 1, 2, 2, 3, 4] and rows[-1]["reward"] == 0.99
    with MetricsLogger(run):  # a fresh run in the same directory starts an empty file
        pass
    assert _lines(run) == []


def test_torn_last_line_is_ignored(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        log.log(1, {"reward": 1.0})
        log.log(2, {"reward": 2.0})
    with open(os.path.join(run, METRICS_FILE), "a") as f:
        f.write('{"step": 3, "rew')  # killed mid-write
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert truncate_metrics(run, 10) == 2
    assert [r["step"] for r in _lines(run)] == [1, 2]
    assert truncate_metrics(str(tmp_path / "empty"), None) == 0


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    run = str(tmp_path)
    with MetricsLogger(run, tensorboard=True) as log:
        log.log(1, {"reward": 0.5, "missing": None})
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "tensorboard")))


def test_missing_optional_sinks_only_warn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(UserWarning) as record:
        log = MetricsLogger(str(tmp_path), tensorboard=True, wandb=True)
    assert {"log.tensorboard", "log.wandb"} <= {str(w.message).split(":")[0] for w in record}
    log.log(1, {"reward": 1.0})
    log.close()
    assert len(_lines(str(tmp_path))) == 1


def test_wandb_receives_numbers_and_resumes_its_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        id = "abc123"

        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run = str(tmp_path / "myrun")
    with MetricsLogger(run, wandb=True, wandb_project="p", config={"algo": {"name": "arpo"}}) as log:
        log.log(1, {"reward": 0.5, "entropy": float("nan")})
    assert calls[0][1]["project"] == "p" and calls[0][1]["name"] == "myrun" and calls[0][1]["id"] is None
    assert calls[1] == ("log", 1, {"reward": 0.5}) and calls[2] == ("finish",)
    calls.clear()
    with MetricsLogger(run, wandb=True, resume_step=1):
        pass
    assert calls[0][1]["id"] == "abc123" and calls[0][1]["resume"] == "allow"


def test_progress_postfix():
    text = progress_postfix({"reward": 0.4213, "accuracy": 0.35, "tokens_per_s": 12345.0, "tool_calls_per_leaf": 1.1})
    assert text == "reward=0.421 acc=35.0% tools=1.10 tok/s=12.3k"
    assert progress_postfix({"tokens_per_s": 950.0}) == "tok/s=950"
    assert progress_postfix({"tokens_per_s": 2.5e6, "eval/accuracy": 0.5}) == "eval=50.0% tok/s=2.5M"
    assert progress_postfix({}) == ""
