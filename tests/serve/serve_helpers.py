"""A tiny served policy for the server tests: the scripted tool-chain Qwen2 (it writes `<python>12*3</python>`
calls when sampled; greedy, it repeats `<python>`), saved as a checkpoint, served on 127.0.0.1 at a free port."""
from __future__ import annotations

import os
import time

from arpo.config import load_config

OVERRIDES = ["model.device=cpu", "model.dtype=float32", "train.threads=1", "data.max_prompt_tokens=64",
             "rollout.max_response_tokens=447", "tools.python_timeout_s=10", "tools.workers=2"]


def make_checkpoint(root: str) -> str:
    from arpo.rollout.toy_policy import tool_chain_policy

    path = os.path.join(root, "toy-agent")
    if not os.path.isdir(path):
        model, tok = tool_chain_policy("python", seed=0, noise=1e-4)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def config(*extra: str):
    return load_config(None, OVERRIDES + list(extra))


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """A bounded wait on an outcome (polling the state, not sleeping as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)
