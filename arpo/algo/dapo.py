"""DAPO (Yu et al. 2025, arXiv 2503.14476) on GRPO's groups of independent trajectories: what `algo=dapo` adds.

Of DAPO's four changes, two live in the loss settings and two here:
- clip-higher: the ratio's upper bound is 1 + 0.28 (lower stays 1 − 0.2), so low-probability tokens can rise —
  `AlgoConfig.upper_clip()`;
- token-mean aggregation: every sampled token of the batch weighs the same (the loss kernel's `token-mean`);
- **dynamic sampling** (`dynamic_sampling`): a prompt whose leaves all got the same reward (all right, all
  wrong) has zero advantage everywhere and only dilutes the token mean, so it is dropped, and more prompts are
  rolled out until the batch is full again — at most `algo.dapo_resample_rounds` extra rounds, after which the
  step trains on what it has. The filter reads the task reward, before the length penalty (the paper filters on
  accuracy);
- **overlong soft penalty** (`overlong_penalty`): with L_max = `rollout.max_response_tokens` and a buffer of
  L_buf tokens, a response of L tokens (sampled + tool-result tokens: what that cap counts) gets 0 up to
  L_max − L_buf, then a linear ramp to −1 at L_max (−1 past it), times `algo.dapo_overlong_penalty`, added to
  its reward before the group advantages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment of a `length`-token response: 0 when `length <= max_length - buffer`,
    `factor * (max_length - buffer - length) / buffer` inside the buffer, `-factor` beyond `max_length`;
    0 for every length when `buffer` is 0 (off)."""
    if buffer < 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in [0, max_length={max_length}], got {buffer}")
    if buffer == 0 or length <= max_length - buffer:
        return 0.0
    if length > max_length:
        return -factor
    return factor * (max_length - buffer - length) / buffer


def overlong_buffer_tokens(max_length: int, fraction: float) -> int:
    """The buffer in tokens: `fraction` of `max_length` (the paper: 4096 of 20480 = 0.2), rounded down."""
    return int(max_length * fraction)


def apply_overlong_penalty(trees: list, max_length: int, buffer: int, factor: float = 1.0) -> dict:
    """Add each leaf's penalty to its reward in place (the task reward is kept in `metadata["task_reward"]`);
    returns sums for metrics: `penalty` (total), `penalised` (leaves with one), `leaves`."""
    total, hit, n = 0.0, 0, 0
    for tree in trees:
        for leaf in tree.leaves:
            p = overlong_penalty(len(tree.leaf_token_ids(leaf)), max_length, buffer, factor)
            leaf.metadata.setdefault("task_reward", leaf.reward)
            leaf.reward += p
            total, hit, n = total + p, hit + (p != 0.0), n + 1
    return {"penalty": total, "penalised": hit, "leaves": n}


def informative(tree) -> bool:
    """Whether the leaves of `tree` got at least two different rewards (else every advantage is 0)."""
    return len(set(tree.rewards())) > 1


@dataclass
class DynamicSample:
    """The outcome of `dynamic_sampling`: the kept trees (at most `target`), every tree rolled out (for cost
    metrics: tool executions, tokens, time are spent on dropped prompts too), the rounds' merged stats, and the
    counts behind the `dapo/*` metrics."""

    kept: list
    rolled: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    rounds: int = 0
    dropped: int = 0
    sampled: int = 0


def merge_stats(into: dict, stats: dict) -> dict:
    """Add a rollout's counters into `into` (peaks by max, everything else summed)."""
    for k, v in stats.items():
        if isinstance(v, (int, float)):
            into[k] = max(into.get(k, v), v) if k.startswith("peak") else into.get(k, 0) + v
    return into


def dynamic_sampling(run_round: Callable[[int], object], target: int, max_extra_rounds: int,
                     common: Callable[[int], int] = lambda n: n) -> DynamicSample:
    """Roll out round 0, 1, ... (`run_round(r)` returns a `RolloutResult`) keeping the informative trees, until
    `target` are kept or `max_extra_rounds` rounds beyond the first have run; returns the first `target` kept.

    `common(n)`: the count every data-parallel rank can match (the minimum over ranks; identity in one process)
    — rounds go on while any rank is short, and every rank keeps the same number, so all run the same updates.
    Each rank filters and refills its own share, so an N-rank DAPO run is not the one-process run token for token
    (ARPO's and GRPO's are): which prompts fill the batch depends on how they were split."""
    if target < 1 or max_extra_rounds < 0:
        raise ValueError(f"dynamic_sampling: target={target} must be >= 1, max_extra_rounds={max_extra_rounds} "
                         f">= 0")
    out = DynamicSample(kept=[])
    while True:
        result = run_round(out.rounds)
        out.rounds += 1
        out.rolled.extend(result.trees)
        merge_stats(out.stats, result.stats)
        out.sampled += len(result.trees)
        good = [t for t in result.trees if informative(t)]
        out.dropped += len(result.trees) - len(good)
        out.kept.extend(good)
        if common(min(len(out.kept), target)) >= target or out.rounds > max_extra_rounds:
            break
    out.kept = out.kept[:common(min(len(out.kept), target))]
    return out


__all__ = ["DynamicSample", "apply_overlong_penalty", "dynamic_sampling", "informative", "merge_stats",
           "overlong_buffer_tokens", "overlong_penalty"]
