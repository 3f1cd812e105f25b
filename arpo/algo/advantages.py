"""Advantages on rollout trees: group normalisation and soft / hard attribution to shared tokens (ARPO.md §3).

A tree's leaves form one GRPO group: Â_i = (r_i − mean(r)) / (std(r) + ε), with the Bessel-corrected std
(`torch.std`, as verl's GRPO estimator used by the reference) and ε = 1e-6; a group of one leaf gets Â = 0.

Attribution decides what a token shared by the set S of leaves (every leaf whose path contains its segment) is
trained with. Everything here is per *segment*, since all tokens of a segment share S.
- **soft**: plain GRPO on one row per leaf, the token counting once per leaf in S with that leaf's advantage.
  The PPO surrogate is linear in the advantage once its sign is fixed, so the sum over S collapses exactly to
  two coefficients: pos = Σ_{i∈S} w_i·max(Â_i, 0) and neg = Σ_{i∈S} w_i·max(−Â_i, 0), where w_i is the leaf's
  aggregation weight (see `leaf_weights`).
- **hard**: the token counts once, with Â = mean_{i∈S} Â_i and a single weight c (see `hard_token_weights`).

The result per segment (`SegmentCoefficients`) is what `arpo_kernels.segmented_policy_loss` consumes, gathered
per token by `arpo.algo.packing`.
"""
from __future__ import annotations

import torch

from arpo_kernels.policy_loss import PolicyLossWeights

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
MODES = ("soft", "hard")


def group_advantages(rewards, eps: float = 1e-6) -> torch.Tensor:
    """Â_i = (r_i − mean) / (std + eps) over one group (Bessel-corrected std); one leaf → 0. Returns fp64."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() < 2:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


def tree_advantages(tree, index: int, advantages: list | None, eps: float = 1e-6) -> torch.Tensor:
    """The leaf advantages of the `index`-th tree of a batch: given ones, or its leaves normalised as a group."""
    a = group_advantages(tree.rewards(), eps) if advantages is None else torch.as_tensor(
        advantages[index], dtype=torch.float64).flatten()
    if a.numel() != len(tree.leaves):
        raise ValueError(f"tree {index}: {a.numel()} advantages for {len(tree.leaves)} leaves")
    return a


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")


def leaf_weights(lengths: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Soft-mode weight of each leaf's tokens, as the aggregation defines it on the duplicated-row batch.

    `lengths`: number of loss tokens per leaf, over the whole (mini-)batch of leaves.
    - token-mean: 1 / Σ_j len_j (every (leaf, token) pair weighs the same);
    - seq-mean-token-sum: 1 / M (token sums per leaf, averaged over the M leaves);
    - seq-mean-token-mean: 1 / (M · len_i) (token means per leaf, averaged); a leaf without loss tokens has
      none to weigh, so it gets 0 but still counts in M.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    lengths = lengths.to(torch.float64)
    m = lengths.numel()
    if aggregation == "token-mean":
        return torch.full_like(lengths, 1.0 / max(lengths.sum().item(), 1.0))
    if aggregation == "seq-mean-token-sum":
        return torch.full_like(lengths, 1.0 / max(m, 1))
    return torch.where(lengths > 0, 1.0 / (max(m, 1) * lengths.clamp(min=1)), torch.zeros_like(lengths))


def hard_token_weights(membership: torch.Tensor, lengths: torch.Tensor, seg_tokens: torch.Tensor,
                       aggregation: str) -> torch.Tensor:
    """Hard-mode weight c_s of each loss token of segment s (every token counted once).

    - token-mean: 1 / (number of unique loss tokens in the batch);
    - seq-mean-token-sum: 1 / M (the token sum over unique tokens, divided by the number of leaves);
    - seq-mean-token-mean: mean_{i∈S} 1 / (M · len_i) (the average of the weights its leaves would give it).
    `membership` [S, M] bool, `lengths` [M] loss tokens per leaf, `seg_tokens` [S] loss tokens per segment.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    n_seg, m = membership.shape
    if aggregation == "token-mean":
        return torch.full((n_seg,), 1.0 / max(seg_tokens.sum().item(), 1.0), dtype=torch.float64,
                          device=membership.device)
    if aggregation == "seq-mean-token-sum":
        return torch.full((n_seg,), 1.0 / max(m, 1), dtype=torch.float64, device=membership.device)
    mem = membership.to(torch.float64)
    w = leaf_weights(lengths, aggregation)
    return (mem @ w) / mem.sum(1).clamp(min=1)


# Per-segment loss coefficients (fp64, shape [S]) share the per-token type of the loss kernel: pos / neg are the
# aggregation-weighted positive / negative advantage mass, weight the total aggregation weight (scales the KL
# term), count / count_pos / count_neg how often a token of the segment appears in the equivalent batch, in all /
# with Â > 0 / with Â < 0. Gathering by each token's segment gives the kernel's input.
SegmentCoefficients = PolicyLossWeights


def soft_coefficients(membership: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor) -> SegmentCoefficients:
    """Soft attribution: sum over the leaves containing each segment. membership [S, M] bool; others [M]."""
    mem = membership.to(torch.float64)
    a = advantages.to(torch.float64)
    w = weights.to(torch.float64)
    return SegmentCoefficients(
        pos=mem @ (w * a.clamp(min=0)),
        neg=mem @ (w * (-a).clamp(min=0)),
        weight=mem @ w,
        count=mem.sum(1),
        count_pos=mem @ (a > 0).to(torch.float64),
        count_neg=mem @ (a < 0).to(torch.float64),
    )


def hard_segment_advantages(membership: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """mean_{i∈S} Â_i per segment (0 for a segment on no leaf's path)."""
    mem = membership.to(torch.float64)
    return (mem @ advantages.to(torch.float64)) / mem.sum(1).clamp(min=1)


def hard_coefficients(membership: torch.Tensor, advantages: torch.Tensor,
                      token_weights: torch.Tensor) -> SegmentCoefficients:
    """Hard attribution: one mean advantage per segment, each token counted once with weight c_s."""
    a = hard_segment_advantages(membership, advantages)
    on_path = (membership.sum(1) > 0).to(torch.float64)
    c = token_weights.to(torch.float64) * on_path
    return SegmentCoefficients(
        pos=c * a.clamp(min=0),
        neg=c * (-a).clamp(min=0),
        weight=c,
        count=on_path,
        count_pos=on_path * (a > 0).to(torch.float64),
        count_neg=on_path * (a < 0).to(torch.float64),
    )
