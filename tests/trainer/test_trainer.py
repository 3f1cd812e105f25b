"""The step loop end to end on the CPU: rollout with real tools → loss → update → checkpoint → exact resume.

The policy is a scripted tool-calling Qwen2 (see trainer_helpers) so that tool calls really happen, and the
reward has spread so that advantages — and therefore gradients — are non-zero.
"""
import json
import math
import os

import pytest
import torch

from arpo.trainer.checkpoint import list_checkpoints
from arpo.trainer.metrics import read_metrics
from arpo.trainer.trainer import Trainer

from trainer_helpers import install_reward, tiny_config

TIMING = ("time", "time/rollout", "time/tools", "time/update", "tokens_per_s")


def _comparable(row: dict, evals: bool = True) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING and (evals or not k.startswith("eval/"))}


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trainer"))


def test_train_resume_matches_uninterrupted_run(root, monkeypatch):
    reward = install_reward(root, monkeypatch)
    full_dir, cut_dir = os.path.join(root, "full"), os.path.join(root, "cut")

    trainer = Trainer(tiny_config(root, full_dir, reward))
    before = _params(trainer.model)
    assert trainer.engine.model is trainer.model  # the engine decodes with the trained parameters, no copy
    m1 = trainer.step(1)
    changed = [k for k, v in _params(trainer.model).items() if not torch.equal(v, before[k])]
    assert changed, "one update must change the weights"
    assert m1["leaves"] == 2 * 4 and m1["tool_calls_per_leaf"] > 0
    assert m1["logprob_gap/mean_abs"] < 1e-4  # sampler and trainer run the same model on the same weights
    assert math.isfinite(m1["loss"]) and m1["grad_norm"] > 0
    trainer.close()

    trainer = Trainer(tiny_config(root, full_dir, reward))
    summary = trainer.train()
    trainer.close()
    full = read_metrics(full_dir)
    assert [r["step"] for r in full] == [0, 1, 2, 3]  # step 0: held-out accuracy before RL
    assert "eval/accuracy" in full[0] and "eval/accuracy" in full[-1]
    assert [s for s, _ in list_checkpoints(full_dir)] == [2, 3]  # keep_last=2
    assert summary["checkpoint"].endswith("step_000003")
    ckpt = summary["checkpoint"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "rng_state.pt"):
        assert os.path.isfile(os.path.join(ckpt, name)), name

    # the same run, interrupted after step 2, then resumed
    trainer = Trainer(tiny_config(root, cut_dir, reward, "train.steps=2"))
    trainer.train()
    trainer.close()
    trainer = Trainer(tiny_config(root, cut_dir, reward, "train.resume=latest"))
    assert trainer.start_step == 2
    trainer.train()
    trainer.close()
    cut = read_metrics(cut_dir)
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    for a, b in zip(full, cut):  # (the interrupted run evaluated at its last step, 2)
        evals = a["step"] != 2
        assert _comparable(a, evals) == _comparable(b, evals), f"step {a['step']} differs after resume"
    assert any(r["tool_calls_per_leaf"] > 0 for r in full[1:])  # the tools were in the loop
    with open(os.path.join(cut_dir, "step_000003", "trainer_state.json")) as f:
        assert json.load(f)["step"] == 3


def test_grpo_mode_runs_trajectories(root, monkeypatch):
    reward = install_reward(root, monkeypatch)
    trainer = Trainer(tiny_config(root, os.path.join(root, "grpo"), reward, "algo=grpo", "algo.kl_coef=0.1",
                                  "train.mini_batch_prompts=2"))
    assert trainer.rollout.cfg.mode == "trajectory" and trainer.ref_model is not None
    m = trainer.step(1)
    trainer.close()
    assert m["branch_rate"] == 0 and m["leaves"] == 8
    assert "update/kl" in m and m["update/kl"] == pytest.approx(0.0, abs=1e-6)  # one mini-batch: policy == reference


def test_embedded_default_creates_model_and_cold_starts_once(tmp_path):
    """`model.path=embedded`: the tiny model is created in the run dir, SFT runs once, later runs reuse both."""
    from arpo.config import load_config

    run = str(tmp_path / "run")
    over = ["model.embedded_hidden_size=32", "model.embedded_layers=1", "model.embedded_intermediate_size=48",
            "model.device=cpu", f"train.run_dir={run}", "sft.steps=2", "sft.batch_size=4", "train.steps=1",
            "train.batch_prompts=2", "train.mini_batch_prompts=2", "rollout.leaves=2", "rollout.initial=2",
            "rollout.max_response_tokens=12", "data.embedded_train_size=8", "data.embedded_eval_size=2",
            "log.progress_bar=false", "train.threads=1"]
    said = []
    trainer = Trainer(load_config(None, over), echo=said.append)
    assert trainer.start_model_path == os.path.join(run, "sft_model") and trainer.sft_summary is not None
    assert os.path.isfile(os.path.join(run, "base_model", "config.json"))
    assert trainer.model.config.hidden_size == 32 and trainer.model.config.tie_word_embeddings
    summary = trainer.train()
    trainer.close()
    assert summary["sft"]["loss"] > 0 and len(read_metrics(os.path.join(run, "sft"))) == 2
    trainer = Trainer(load_config(None, over), echo=said.append)  # a second run in the same directory
    trainer.close()
    assert trainer.sft_summary is None and any("reusing" in s for s in said)
