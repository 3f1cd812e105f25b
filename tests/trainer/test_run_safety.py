"""A run never loses or mixes data (issue 23), with the real `arpo train` command on the CPU:

* a second run into a used run dir is refused and leaves the first run byte-identical; `--overwrite` replaces it;
* a truncated and a missing-file checkpoint are skipped for the previous valid one, and resuming from it
  reproduces the uninterrupted run's later metrics; a bad `--resume PATH` or `arpo eval` dir is one error line;
* SIGTERM in the middle of step 3 leaves a checkpoint of step 3 and a run that resumes to the same metrics.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal

import pytest

from arpo.cli import main
from arpo.trainer.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     verify_checkpoint)
from arpo.trainer.metrics import read_metrics
from arpo.trainer.signals import SecondSignal, StopOnSignal
from arpo.trainer.trainer import Trainer

from trainer_helpers import as_cli_args, make_policy_dir, reward_root, tiny_config

TIMING = ("time", "time/rollout", "time/tools", "time/update", "tokens_per_s")
STEPS = ["train.steps=4", "train.keep_last=0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    with reward_root(str(tmp_path_factory.mktemp("run_safety"))) as path:
        yield path


def args(root: str, run_dir: str, *extra: str) -> list[str]:
    return as_cli_args(tiny_config(root, run_dir, "trainer_test_reward:digit_reward", *STEPS, *extra))


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def snapshot(run_dir: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(run_dir):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(root):
    """An uninterrupted 4-step run, a checkpoint after each step."""
    run = os.path.join(root, "reference")
    assert main(["train", *args(root, run)]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3, 4]
    return run


def test_a_used_run_dir_is_refused_untouched_and_overwrite_replaces_it(root, reference, capsys):
    run = os.path.join(root, "used")
    shutil.copytree(reference, run)
    with open(os.path.join(run, "notes.txt"), "w") as f:  # not arpo's: --overwrite leaves it
        f.write("mine")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *args(root, run, "train.steps=1")]) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run" in err and "--resume" in err and "train.run_dir=" in err \
        and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before  # byte-identical

    assert main(["train", *args(root, run, "train.steps=1"), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err

    assert main(["train", *args(root, run, "train.steps=1"), "--overwrite"]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [1]  # none of the old run's later checkpoints
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    assert comparable(read_metrics(run))[:1] == comparable(read_metrics(reference))[:1]
    assert set(os.listdir(run)) - {"plots"} == {"config.yaml", "metrics.jsonl", "notes.txt", "step_000001",
                                                 "summary.json"}


def test_sft_refuses_a_used_run_dir(root, capsys):
    run = os.path.join(root, "sft_used")
    os.makedirs(os.path.join(run, "sft_model"))
    assert main(["sft", *args(root, run, "sft.steps=1")]) == 2
    err = capsys.readouterr().err
    assert "earlier SFT run" in err and "--overwrite" in err and "train.run_dir=" in err
    assert os.listdir(run) == ["sft_model"]


def test_bad_checkpoints_are_skipped_and_resume_reproduces_the_run(root, reference, capsys):
    run = os.path.join(root, "damaged")
    shutil.copytree(reference, run)
    step3, step4 = (os.path.join(run, f"step_00000{s}") for s in (3, 4))
    weights = os.path.join(step4, "model.safetensors")
    with open(weights, "r+b") as f:  # disk full / a killed copy: the weights cut in half
        f.truncate(os.path.getsize(weights) // 2)
    os.remove(os.path.join(step3, "optimizer.pt"))
    assert "model.safetensors" in verify_checkpoint(step4) and "optimizer.pt" in verify_checkpoint(step3)
    warned = []
    assert latest_checkpoint(run, warn=warned.append) == os.path.join(run, "step_000002")
    assert "model.safetensors" in warned[0] and "optimizer.pt" in warned[1]

    capsys.readouterr()
    assert main(["train", *args(root, run), "--resume", step4]) == 2  # an explicit bad checkpoint: an error
    err = capsys.readouterr().err
    assert "model.safetensors" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", step4]) == 2  # so is evaluating it
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    assert main(["train", *args(root, run), "--resume"]) == 0  # the newest valid one: step 2
    assert "skipping checkpoint" in capsys.readouterr().err
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))
    assert verify_checkpoint(step4) is None


def test_a_model_dir_with_truncated_weights_is_one_error(root, tmp_path):
    from arpo.build import load_policy
    from arpo.config import load_config

    bad = str(tmp_path / "policy")
    shutil.copytree(make_policy_dir(root), bad)
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="policy: cannot load the model"):
        load_policy(bad, load_config(None, ["model.device=cpu"]).model)


def test_sigterm_in_step_3_checkpoints_it_and_resumes_to_the_same_run(root, reference, monkeypatch, capsys):
    run = os.path.join(root, "sigterm")
    step = Trainer.step

    def step_then_signal(self, n):
        if n == 3:  # a scheduler's pre-emption notice arrives in the middle of step 3
            signal.raise_signal(signal.SIGTERM)
        return step(self, n)

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["train", *args(root, run, "train.save_every=0")]) == 128 + signal.SIGTERM
    assert [s for s, _ in list_checkpoints(run)] == [3]  # save_on_signal: the step it finished
    assert verify_checkpoint(os.path.join(run, "step_000003")) is None
    assert load_checkpoint(os.path.join(run, "step_000003")).step == 3
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == handler  # handlers restored

    monkeypatch.setattr(Trainer, "step", step)
    assert main(["train", *args(root, run, "train.save_every=0"), "--resume"]) == 0
    assert comparable(read_metrics(run)) == comparable(read_metrics(reference))


def test_a_second_ctrl_c_stops_at_once_a_repeated_sigterm_does_not():
    said = []
    with StopOnSignal(said.append) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM and "SIGTERM" in said[0]
        signal.raise_signal(signal.SIGTERM)  # the scheduler's, then torchrun's copy: still finishing the step
        assert stop.signum == signal.SIGTERM
        with pytest.raises(SecondSignal) as got:
            signal.raise_signal(signal.SIGINT)
        assert got.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
