"""The `arpo` command line: help, --print-config, config errors (exit 2), and eval / sft / plot on tiny inputs."""
import os
import subprocess
import sys

import pytest
import yaml

from arpo.cli import load_cli_config, main, split_config_args
from arpo.config import load_config


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sft", "eval", "plot", "bench"):
        assert cmd in out
    for cmd in ("train", "sft", "eval", "plot"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: arpo " + cmd in capsys.readouterr().out


def test_print_config_is_loadable_yaml_with_overrides(tmp_path, capsys):
    assert main(["train", "--print-config", "rollout.leaves=6", "algo=grpo"]) == 0
    text = capsys.readouterr().out
    assert "# M: trajectories (leaves) per prompt" in text  # help text above each field
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.rollout.leaves == 6 and cfg.algo.name == "grpo" and cfg.rollout_mode == "trajectory"
    assert cfg.train.run_dir == "runs/embedded-grpo"  # the baseline does not overwrite the ARPO run
    assert yaml.safe_load(text)["model"]["path"] == "embedded"


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    assert split_config_args([str(path), "train.seed=3"]) == (str(path), ["train.seed=3"])
    cfg = load_cli_config([str(path), "train.seed=3", "train.run_dir=x"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.run_dir) == (7, 3, "x")


@pytest.mark.parametrize("args, msg", [
    (["train", "rollout.leafs=4"], "did you mean 'leaves'"),
    (["train", "algo=ppo"], "expected one of arpo, grpo"),
    (["train", "train.steps=-1"], "train.steps=-1: must be > 0"),
    (["train", "nope.yaml"], "config file not found"),
    (["train", "x=1", "oops"], "expected section.key=value"),
    (["train", "model.path=/does/not/exist"], "no such directory"),
    (["train", "data.train_files=[missing.jsonl]"], "no such file"),
    (["eval", "/does/not/exist"], "no such checkpoint directory"),
    (["sft", "sft.steps=0"], "sft.steps must be > 0"),
])
def test_bad_config_exits_2_with_one_line(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("arpo: error:") and msg in err


def test_plot_needs_a_run_dir(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "arpo", "train", "--print-config", "train.steps=3"],
                         capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and "steps: 3" in out.stdout


def test_sft_then_eval_then_plot(tmp_path, capsys):
    """`arpo sft` on the embedded demonstrations with a tiny model, `arpo eval` on its output, `arpo plot`."""
    run = str(tmp_path / "run")
    small = ["model.embedded_hidden_size=32", "model.embedded_layers=1", "model.embedded_intermediate_size=48",
             "model.device=cpu", f"train.run_dir={run}", "sft.steps=3", "sft.batch_size=4",
             "data.embedded_train_size=16", "data.embedded_eval_size=2", "log.progress_bar=false",
             "rollout.max_response_tokens=16", "train.threads=1"]
    assert main(["sft", *small]) == 0
    out = capsys.readouterr().out
    sft_dir = os.path.join(run, "sft_model")
    assert "final loss" in out and os.path.isfile(os.path.join(sft_dir, "model.safetensors"))
    assert main(["eval", sft_dir, *small, "--samples", "2", "--temperature", "1.0", "--json"]) == 0
    metrics = yaml.safe_load(capsys.readouterr().out)  # JSON is YAML
    assert metrics["questions"] == 2 and metrics["samples"] == 2 and 0.0 <= metrics["pass@2"] <= 1.0
    assert main(["plot", os.path.join(run, "sft")]) == 0
    assert "loss.png" in capsys.readouterr().out


def test_rollout_takes_the_config_and_overrides(tmp_path, capsys):
    """`arpo rollout` reads the same YAML + overrides as `train`: the tree has the configured leaves, the trees
    land in --out, and a bad override is the same one-line error."""
    import json

    out = tmp_path / "trees.jsonl"
    assert main(["rollout", "--toy", "--n", "1", "--out", str(out), "rollout.leaves=4", "rollout.initial=2",
                 "rollout.max_response_tokens=48", f"train.run_dir={tmp_path / 'run'}"]) == 0
    trees = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(trees) == 1 and len(trees[0]["leaves"]) == 4
    assert "1 trees, 4 leaves" in capsys.readouterr().out
    assert main(["rollout", "--toy", "rollout.leafs=4"]) == 2
    assert "did you mean 'leaves'" in capsys.readouterr().err
