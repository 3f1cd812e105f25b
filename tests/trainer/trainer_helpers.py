"""A tiny, fast training setup for the trainer tests: a scripted tool-calling policy saved as a checkpoint, a
reward with spread (so advantages are non-zero), and a config small enough to run a step in about a second."""
from __future__ import annotations

import contextlib
import os
import sys

from arpo.config import load_config

REWARD_MODULE = '''
from arpo.tools import BaseTool, ToolResult


class EchoTool(BaseTool):
    """Instant and deterministic: the length and the reversed content."""
    name, tag = "echo", "q"

    def run(self, text):
        return ToolResult(f"{len(text)} {text[::-1][:12]}", ok=True)


def digit_reward(completion, ground_truth, **row):
    """More digits, more reward: any policy's leaves get different rewards."""
    return sum(c.isdigit() for c in completion) / 10.0 - (1.0 if "<answer>" not in completion else 0.0)


UNIFORM_BELOW = 40000


def split_reward(completion, ground_truth, **row):
    """0 for every leaf of a question whose answer is below UNIFORM_BELOW (a group that teaches nothing: DAPO
    drops it), digit_reward's spread for the others."""
    truth = ground_truth[0] if isinstance(ground_truth, (list, tuple)) else ground_truth
    return 0.0 if int(str(truth)) < UNIFORM_BELOW else digit_reward(completion, ground_truth)
'''


def make_policy_dir(root: str) -> str:
    """A Qwen2 checkpoint (hidden 64, 2 layers) of the tool-chain policy that writes `<q>1*2+3</q>` calls."""
    from arpo.rollout.toy_policy import tool_chain_policy

    path = os.path.join(root, "policy")
    if not os.path.isdir(path):
        model, tok = tool_chain_policy("q", seed=0, hidden_size=64, layers=2, heads=4, kv_heads=2,
                                       intermediate_size=96, noise=0.01)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


@contextlib.contextmanager
def reward_root(path: str):
    """`path` with the test policy and the reward/tool module, importable while inside (module-scoped fixtures,
    and torchrun ranks that get `path` on PYTHONPATH)."""
    make_policy_dir(path)
    with open(os.path.join(path, "trainer_test_reward.py"), "w", encoding="utf-8") as f:
        f.write(REWARD_MODULE)
    sys.path.insert(0, path)
    try:
        yield path
    finally:
        sys.path.remove(path)
        sys.modules.pop("trainer_test_reward", None)


def install_reward(root: str, monkeypatch) -> str:
    """Write the test module (reward + echo tool) importable by dotted path; returns the reward's path."""
    mod = os.path.join(root, "trainer_test_reward.py")
    with open(mod, "w", encoding="utf-8") as f:
        f.write(REWARD_MODULE)
    monkeypatch.syspath_prepend(root)
    sys.modules.pop("trainer_test_reward", None)
    return "trainer_test_reward:digit_reward"


def tiny_config(root: str, run_dir: str, reward: str, *extra: str):
    return load_config(None, [
        f"model.path={make_policy_dir(root)}", "model.device=cpu", f"reward.name={reward}",
        f"train.run_dir={run_dir}", "train.steps=3", "train.batch_prompts=2", "train.mini_batch_prompts=1",
        "train.micro_batch_tokens=64", "train.save_every=1", "train.keep_last=2", "train.eval_every=0",
        "train.threads=1", "rollout.leaves=4", "rollout.initial=2", "rollout.probe_tokens=2",
        "rollout.max_tool_calls=1", "data.embedded_train_size=16",
        "data.embedded_eval_size=2", "sft.steps=0", "optim.lr=1e-4", "log.progress_bar=false",
        "tools.enabled=trainer_test_reward:EchoTool", "rollout.max_response_tokens=48", *extra])


def as_cli_args(cfg) -> list[str]:
    """A config as the `section.key=value` arguments of `arpo train` that rebuild it."""
    import json

    from arpo.config import config_to_dict

    args = []
    for section, fields in config_to_dict(cfg).items():
        if isinstance(fields, dict):
            args += [f"{section}.{k}={json.dumps(v)}" for k, v in fields.items() if v is not None]
    return args
