"""Held-out evaluation (`arpo eval`, and `eval/*` metrics during `arpo train`): accuracy, tool calls, pass@k.

Each question is answered `k` times (`train.eval_samples`) through the engine with the real tools in the loop:
trajectory rollouts, no branching, greedy when `train.eval_temperature` is 0 (then k = 1: greedy samples are
identical). A sample is *correct* when its reward reaches 1 (the right answer under the embedded and exact-match
rewards, F1 = 1 or mathematical equality under the arpo reward). Reported, as fractions:
accuracy (mean over all samples), pass@k (questions with at least one correct sample), format_ok (samples
without the −1 format penalty), tool_calls (per sample), reward (mean), response_tokens (mean per sample).

    arpo eval runs/embedded/step_000060 --samples 4 --temperature 1.0
"""
from __future__ import annotations

import time

import torch

from arpo.build import build_rollout
from arpo.trainer.distributed import sum_across_ranks

CORRECT_AT = 1.0 - 1e-6


def is_correct(reward: float) -> bool:
    return reward >= CORRECT_AT


def evaluate(engine, tools, reward_fn, prompts: list, cfg, *, samples: int | None = None,
             temperature: float | None = None, seed: int = 12345, batch_size: int = 64,
             part: tuple[int, int] = (0, 1)) -> dict:
    """Metrics over `prompts` (rollout PromptInputs); the model is left in eval mode. `samples`/`temperature`
    default to train.eval_samples/eval_temperature (resolved once, by `TrainConfig.eval_sampling`).

    `part=(rank, world)`: this data-parallel rank answers every world-th question from `rank` and the metrics are
    reduced over the ranks; a question's samples are seeded by its place in `prompts`, wherever it runs."""
    k, temperature = cfg.train.eval_sampling(samples, temperature)
    was_training = engine.model.training
    engine.model.eval()
    rollout = build_rollout(engine, tools, reward_fn, cfg, mode="trajectory", leaves=k, temperature=temperature)
    rank, world = part
    mine = list(range(rank, len(prompts), world))
    n_correct = n_pass = n_fmt = n_samples = 0
    calls = reward = tokens = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        for tree in rollout.run([prompts[i] for i in chunk], seed=seed, seed_indices=chunk).trees:
            oks = [is_correct(l.reward) for l in tree.leaves]
            n_correct += sum(oks)
            n_pass += any(oks)
            n_fmt += sum(l.reward > -1.0 for l in tree.leaves)
            n_samples += len(tree.leaves)
            calls += sum(l.tool_calls for l in tree.leaves)
            reward += sum(l.reward for l in tree.leaves)
            tokens += sum(len(tree.leaf_token_ids(l)) for l in tree.leaves)
    engine.model.train(was_training)
    if world > 1:
        n_correct, n_pass, n_fmt, n_samples, calls, reward, tokens = sum_across_ranks(
            [n_correct, n_pass, n_fmt, n_samples, calls, reward, tokens])
    n_q = max(len(prompts), 1)
    n_s = max(n_samples, 1)
    return {"accuracy": n_correct / n_s, f"pass@{k}": n_pass / n_q, "format_ok": n_fmt / n_s,
            "tool_calls": calls / n_s, "reward": reward / n_s, "response_tokens": tokens / n_s,
            "questions": len(prompts), "samples": k, "time_s": time.perf_counter() - t0}


@torch.no_grad()
def sample_transcripts(engine, tools, reward_fn, prompts: list, cfg, n: int = 3, seed: int = 0) -> list[str]:
    """Greedy answers to the first `n` prompts as readable text (for the end-of-run printout)."""
    rollout = build_rollout(engine, tools, reward_fn, cfg, mode="trajectory", leaves=1, temperature=0.0)
    out = []
    for tree in rollout.run(prompts[:n], seed=seed).trees:
        leaf = tree.leaves[0]
        out.append(f"{tree.prompt} -> {leaf.text.strip()}  [reward {leaf.reward:g}]")
    return out
