"""Synthetic rollout trees for tests and benchmarks (no model, no tools).

`random_tree` makes irregular trees that exercise every corner the packing must handle (leaves ending on inner
segments, empty segments, masked first tokens, chains without branching). `arpo_tree` makes trees shaped like
ARPO's rollouts: N global chains of `depth` segments, each non-final segment ending in a tool result (loss mask
0), and M − N branches that fork right after a tool result and run to the same depth.
"""
from __future__ import annotations

import random

from arpo.rollout.tree import ROOT, RolloutTree


def _fill(tree: RolloutTree, parent: int, n: int, rng: random.Random, vocab: int, masked_tail: int = 0,
          mask_prob: float = 0.0) -> int:
    """Add a segment of n tokens under `parent`; its last `masked_tail` tokens (and random ones) get mask 0."""
    ids = [rng.randrange(vocab) for _ in range(n)]
    lps = [-rng.expovariate(1.0) for _ in range(n)]
    ents = [rng.uniform(0.0, 3.0) for _ in range(n)]
    mask = [0 if (j >= n - masked_tail or rng.random() < mask_prob) else 1 for j in range(n)]
    return tree.add_segment(parent, ids, lps, ents, mask).id


def random_tree(seed: int, vocab: int = 50, prompt_len: tuple[int, int] = (1, 6), n_global: int = 2,
                n_leaves: int = 5, seg_len: tuple[int, int] = (0, 5), max_depth: int = 3,
                mask_prob: float = 0.3, reward_levels: int = 3) -> RolloutTree:
    """An irregular tree with `n_leaves` leaves (n_global chains from the prompt, the rest branching anywhere)."""
    rng = random.Random(seed)
    tree = RolloutTree(prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))],
                       prompt=f"random prompt {seed}")
    for j in range(n_leaves):
        parent = ROOT if j < n_global or not tree.segments else rng.randrange(len(tree.segments))
        for _ in range(rng.randint(1, max_depth)):
            parent = _fill(tree, parent, rng.randint(*seg_len), rng, vocab, mask_prob=mask_prob)
        reward = rng.randrange(reward_levels) / max(reward_levels - 1, 1) if reward_levels > 1 else rng.random()
        tree.add_leaf(parent, reward=reward, tool_calls=rng.randrange(3), finish_reason="stop",
                      text=f"leaf {j}")
    return tree


def arpo_tree(seed: int, vocab: int = 32000, prompt_len: int = 256, n_leaves: int = 16, n_global: int = 8,
              depth: int = 4, seg_len: int = 64, result_len: int = 16) -> RolloutTree:
    """An ARPO-shaped tree: every leaf has `depth` segments of `seg_len` tokens; branches fork after a result."""
    if not 1 <= n_global <= n_leaves:
        raise ValueError(f"need 1 <= n_global <= n_leaves, got n_global={n_global}, n_leaves={n_leaves}")
    rng = random.Random(seed)
    tree = RolloutTree(prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)], prompt=f"arpo prompt {seed}")
    chains: list[list[int]] = []

    def grow(parent: int, level: int) -> list[int]:
        segs = []
        for k in range(level, depth):
            tail = result_len if k < depth - 1 else 0  # every segment but the last ends with a tool result
            parent = _fill(tree, parent, seg_len, rng, vocab, masked_tail=tail)
            segs.append(parent)
        return segs

    for _ in range(n_global):
        chains.append(grow(ROOT, 0))
    while len(chains) < n_leaves and depth > 1:
        chain = rng.choice(chains)
        k = rng.randrange(depth - 1)  # fork right after the tool result closing segment k of that chain
        chains.append(chain[: k + 1] + grow(chain[k], k + 1))
    for chain in chains:
        tree.add_leaf(chain[-1], reward=float(rng.random() < 0.5), tool_calls=depth - 1, finish_reason="stop")
    return tree
