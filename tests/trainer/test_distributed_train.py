"""`arpo train --nproc 2` (torchrun, gloo, FSDP2) is the single-process trainer, distributed (issue 10).

The real command on the CPU: two ranks roll out their halves of each step's prompts with their own engines on the
gathered weights, update the sharded policy and write one checkpoint. Two steps later its weights and metrics
equal those of a single-process run on the same batches (fp32, 1e-5); its export loads in transformers; and each
run's step-1 checkpoint resumes on the other number of ranks to reach the same step 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from arpo.trainer import distributed as D
from trainer_helpers import as_cli_args, make_policy_dir, reward_root, tiny_config

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available() and D.HAS_FSDP2),
    reason="needs torch.distributed with the gloo backend and FSDP2")

# 4 prompts per step, 2 per mini-batch: every rank holds one prompt of each mini-batch
OVERRIDES = ["train.steps=2", "train.batch_prompts=4", "train.mini_batch_prompts=2", "train.keep_last=0"]
TOL = dict(rtol=1e-5, atol=1e-5)
EXACT_METRICS = ("reward", "accuracy", "leaves", "packed_tokens", "tool_calls_per_leaf", "mixed_groups",
                 "optimizer_steps")
CLOSE_METRICS = ("loss", "grad_norm", "update/clip_frac", "update/approx_kl", "update/entropy")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    with reward_root(str(tmp_path_factory.mktemp("dist_train"))) as path:
        yield path


def config(root: str, run_dir: str, *extra: str):
    return tiny_config(root, run_dir, "trainer_test_reward:digit_reward", *OVERRIDES, *extra)


def cli_args(root: str, run_dir: str, *extra: str) -> list[str]:
    """The same config as `config`, as `arpo train` arguments."""
    return as_cli_args(config(root, run_dir, *extra))


def run_in_process(root: str, run_dir: str, resume: str | None = None, extra: tuple = ()) -> None:
    from arpo.trainer.trainer import Trainer

    cfg = config(root, run_dir, *extra)
    cfg.train.resume = resume
    trainer = Trainer(cfg, progress=False, echo=lambda *a: None)
    try:
        trainer.train()
    finally:
        trainer.close()


def run_two_ranks(root: str, run_dir: str, resume: str | None = None, extra: tuple = (),
                  expect_failure: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "arpo", "train", *cli_args(root, run_dir, *extra), "--nproc", "2"]
    if resume:
        cmd += ["--resume", resume]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert (done.returncode != 0) == expect_failure, \
        f"2-rank run: exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def weights(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, f"step_{step:06d}", "model.safetensors"))


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def runs(root):
    one, two = os.path.join(root, "one"), os.path.join(root, "two")
    run_in_process(root, one)
    run_two_ranks(root, two)
    return one, two


def test_two_ranks_train_like_one_process(root, runs):
    one, two = runs
    assert os.path.isfile(os.path.join(two, "step_000002", "dcp", ".metadata"))
    for step in (1, 2):
        assert_same_weights(weights(two, step), weights(one, step), f"step {step}")
    from safetensors.torch import load_file

    before = load_file(os.path.join(make_policy_dir(root), "model.safetensors"))
    assert max((weights(one, 2)[k] - before[k]).abs().max() for k in before) > 1e-4  # the steps did train

    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [0, 1, 2]  # rank 0 logs, once
    for a, b in zip(rows_one[1:], rows_two[1:]):
        for k in EXACT_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
        for k in CLOSE_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert rows_one[1]["mixed_groups"] > 0 and rows_one[1]["grad_norm"] > 1e-3  # a real gradient, not zeros


def test_export_loads_in_transformers(root, runs):
    transformers = pytest.importorskip("transformers")
    from arpo.model import Qwen2Model

    path = os.path.join(runs[1], "step_000002")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Qwen2Model.from_pretrained(os.path.join(runs[0], "step_000002"), dtype=torch.float32)
    ids = torch.tensor([[3, 5, 7, 11, 13, 2]])
    with torch.no_grad():
        want = ours.compute_logits(ours(ids[0], torch.arange(ids.shape[1])))
        torch.testing.assert_close(hf(input_ids=ids).logits[0], want, **TOL)
    assert transformers.AutoTokenizer.from_pretrained(path) is not None


def test_resume_on_a_different_number_of_ranks(root, runs):
    one, two = runs
    two_to_one, one_to_two = os.path.join(root, "2to1"), os.path.join(root, "1to2")
    run_in_process(root, two_to_one, resume=os.path.join(two, "step_000001"))  # DCP shards -> one process
    run_two_ranks(root, one_to_two, resume=os.path.join(one, "step_000001"))    # one process -> 2 shards
    want = weights(one, 2)
    assert_same_weights(weights(two_to_one, 2), want, "2 ranks -> 1")
    assert_same_weights(weights(one_to_two, 2), want, "1 rank -> 2")
    for run in (two_to_one, one_to_two):
        assert [r["step"] for r in metrics(run)] == [2]
        assert metrics(run)[0]["reward"] == pytest.approx(metrics(one)[2]["reward"])


SIGNAL_MODULE = '''
import json, os, signal
from trainer_test_reward import EchoTool, digit_reward as _digits


def _last_logged_step(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return None
    return rows[-1]["step"] if rows else None


def digit_reward(completion, ground_truth, **row):
    """digit_reward; on rank 0 of the run in $ARPO_TEST_SIGNAL_DIR, once, in step 3: SIGTERM to itself only."""
    run_dir = os.environ.get("ARPO_TEST_SIGNAL_DIR")
    if run_dir and os.environ.get("RANK") == "0" and _last_logged_step(run_dir) == 2:
        try:
            os.close(os.open(os.path.join(run_dir, "signalled"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    return _digits(completion, ground_truth, **row)
'''


def test_sigterm_to_one_rank_stops_both_after_the_step_and_resumes(root, monkeypatch):
    """SIGTERM reaches rank 0 alone in the middle of step 3: both ranks finish it, write the step-3 checkpoint
    together (the DCP save is collective) and stop; resuming on two ranks reaches the uninterrupted run."""
    from arpo.trainer.checkpoint import list_checkpoints, verify_checkpoint

    with open(os.path.join(root, "trainer_signal_reward.py"), "w", encoding="utf-8") as f:
        f.write(SIGNAL_MODULE)
    extra = ("train.steps=4", "train.save_every=0", "reward.name=trainer_signal_reward:digit_reward")
    cut, whole = os.path.join(root, "sigterm"), os.path.join(root, "whole")
    run_in_process(root, whole, extra=extra)  # no $ARPO_TEST_SIGNAL_DIR here: never signalled
    monkeypatch.setenv("ARPO_TEST_SIGNAL_DIR", cut)
    done = run_two_ranks(root, cut, extra=extra, expect_failure=True)  # torchrun reports the ranks' 143
    assert os.path.exists(os.path.join(cut, "signalled")) and "exitcode  : 143" in done.stderr, done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(cut)] == [3]
    assert verify_checkpoint(os.path.join(cut, "step_000003")) is None
    assert [r["step"] for r in metrics(cut)] == [0, 1, 2, 3]
    run_two_ranks(root, cut, resume="latest", extra=extra)
    rows_one, rows_two = metrics(whole), metrics(cut)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [0, 1, 2, 3, 4]
    for a, b in zip(rows_one[1:], rows_two[1:]):
        for k in EXACT_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (a["step"], k)
        for k in CLOSE_METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_nproc_checks_the_batch_split_before_launching(root, capsys):
    from arpo.cli import main

    assert main(["train", *cli_args(root, os.path.join(root, "bad")), "--nproc", "3"]) == 2
    assert "not divisible by the number of ranks (3)" in capsys.readouterr().err
