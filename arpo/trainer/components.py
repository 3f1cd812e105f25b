"""Building the run's parts from the config: tools, reward, the engine on the policy's weights, the rollout.

Kept apart from the step loop so that `arpo train`, `arpo eval` and the tests assemble them the same way.
The engine wraps the *same* model object the optimiser updates (zero-copy): each rollout decodes with the
weights of the latest update.
"""
from __future__ import annotations

import math

import torch

from arpo.engine import LLMEngine
from arpo.rollout import RolloutConfig, TreeRollout
from arpo.tools import ToolExecutor, load_tools

BLOCK_SIZE = 16


def build_tools(cfg) -> ToolExecutor:
    t = cfg.tools
    specs: dict[str, dict] = {}
    for name in t.enabled:
        if name == "python":
            specs[name] = {"timeout_s": t.python_timeout_s, "memory_mb": t.python_memory_mb}
        elif name == "search":
            kw: dict = {"top_k": t.search_top_k}
            if t.search_url:
                kw.update(url=t.search_url, protocol=t.search_protocol)
            elif t.search_corpus:
                kw["corpus_path"] = t.search_corpus
            specs[name] = kw
        else:
            specs[name] = {}
    return ToolExecutor(load_tools(specs), max_workers=t.workers, timeout_s=t.python_timeout_s + 5.0,
                        max_result_chars=t.max_result_chars)


def build_reward(cfg):
    from arpo.rewards import load_reward

    return load_reward(cfg.reward.name)


def max_model_len(cfg) -> int:
    return cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens + 1


def build_engine(model, tokenizer, cfg, max_seqs: int, *, sharded: bool = False,
                 kv_dtype: torch.dtype | None = None) -> LLMEngine:
    """An engine on `model` with room for `max_seqs` sequences of full length (on CUDA: a KV cache of 20% of the
    free memory — the optimiser's state is allocated after it, at the first update). It stops on every EOS id
    the checkpoint declares (generation_config.json, config.json, the tokenizer), in rollouts and eval alike.

    Prefix caching is off: cached blocks would hold K/V computed with the weights of an earlier step. An
    FSDP2-`sharded` model decodes only inside `distributed.full_parameters`, whose gathered weights live at new
    addresses every rollout: no CUDA graphs then (they would replay stale weight pointers)."""
    length = max_model_len(cfg)
    kw: dict = {"memory_fraction": 0.2, "kv_dtype": kv_dtype}
    if sharded:
        kw["decode_graphs"] = "off"
    if model.device.type != "cuda":
        kw["num_blocks"] = max_seqs * math.ceil(length / BLOCK_SIZE) + 8
    return LLMEngine(model, block_size=BLOCK_SIZE, max_model_len=length, tokenizer=tokenizer,
                     max_num_seqs=max(256, max_seqs),
                     max_num_batched_tokens=max(4096, cfg.data.max_prompt_tokens * 4), seed=cfg.train.seed,
                     enable_prefix_caching=False, **kw)


def rollout_config(cfg, *, mode: str | None = None, leaves: int | None = None, temperature: float | None = None,
                   seed: int | None = None) -> RolloutConfig:
    """The RolloutConfig of `cfg.rollout` (mode resolved from algo.name). Tool results are awaited every step
    (`sync_tools`), which makes a rollout a function of its seed alone — what exact resumption needs."""
    over: dict = {"mode": mode or cfg.rollout_mode, "seed": cfg.train.seed if seed is None else seed,
                  "sync_tools": True}
    if leaves is not None:
        over["leaves"] = leaves
        over["initial"] = min(cfg.rollout.initial, leaves)
    if temperature is not None:
        over["temperature"] = temperature
    return RolloutConfig.from_section(cfg.rollout, **over)


def make_rollout(engine, tools, reward_fn, cfg, **kw) -> TreeRollout:
    return TreeRollout(engine, tools, rollout_config(cfg, **kw), reward_fn, tokenizer=engine.tokenizer)


def step_seed(base: int, step: int) -> int:
    """The rollout seed of 1-based training `step`: independent of how many steps ran in this process."""
    return (base * 1_000_003 + step * 7919) & ((1 << 62) - 1)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
