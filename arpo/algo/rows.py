"""One row per leaf: the duplicated-row batch that the reference trains on.

Why: it is the definition the tree-packed batch must reproduce (tests compare the two), the baseline the
benchmark measures against, and the plain GRPO path for trajectory-level rollouts. Row i is leaf i's prompt
followed by the segments on its path, right-padded; position p is predicted by the hidden state at p − 1.

`grpo_row_loss` is verl's dual-clip PPO loss written literally on these rows (per-token max/min/clamp,
`agg_loss`-style aggregation): the formulation the segmented loss kernel must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arpo.algo.advantages import AGGREGATIONS, check_choice, tree_advantages
from arpo.rollout.tree import RolloutTree


@dataclass
class LeafRows:
    input_ids: torch.Tensor     # [R, Lmax] long, right-padded with pad_id
    lengths: torch.Tensor       # [R] long, real tokens per row
    loss_mask: torch.Tensor     # [R, Lmax] long, 1 on trained response tokens (never on the prompt or padding)
    old_logprobs: torch.Tensor  # [R, Lmax] float32, behaviour log-probs at the response positions (0 elsewhere)
    advantages: torch.Tensor    # [R] float64
    leaf_tree: torch.Tensor     # [R] long

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what a padding-free trainer would forward."""
        return int(self.lengths.sum())


def leaf_rows(trees: list[RolloutTree], advantages: list | None = None, eps: float = 1e-6,
              pad_id: int = 0) -> LeafRows:
    """The leaves of `trees` as separate rows; advantages as in `pack_trees`."""
    rows, masks, lps, adv, leaf_tree = [], [], [], [], []
    for b, tree in enumerate(trees):
        tree.validate()
        a = tree_advantages(tree, b, advantages, eps)
        p = [0] * len(tree.prompt_ids)
        for leaf in tree.leaves:
            rows.append(tree.leaf_token_ids(leaf, with_prompt=True))
            masks.append(p + tree.leaf_values(leaf, "loss_mask"))
            lps.append([0.0] * len(p) + tree.leaf_values(leaf, "logprobs"))
            leaf_tree.append(b)
        adv.append(a)
    width = max((len(r) for r in rows), default=0)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    old = torch.zeros(n, width, dtype=torch.float32)
    for i, (r, m, lp) in enumerate(zip(rows, masks, lps)):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
        old[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return LeafRows(ids, torch.tensor([len(r) for r in rows], dtype=torch.long), mask, old,
                    torch.cat(adv) if adv else torch.zeros(0, dtype=torch.float64),
                    torch.tensor(leaf_tree, dtype=torch.long))


def aggregate(loss: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """verl's agg_loss over [R, T] per-token values; a row without loss tokens adds 0 to seq-mean-token-mean."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    mask = mask.to(loss.dtype)
    if aggregation == "token-mean":
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    per_row = (loss * mask).sum(-1)
    if aggregation == "seq-mean-token-mean":
        per_row = per_row / mask.sum(-1).clamp(min=1)
    return per_row.mean()


def grpo_row_loss(logp, old_logp, advantages, mask, aggregation="token-mean", *, clip_low=0.2, clip_high=0.2,
                  dual_clip=3.0, ref_logp=None, kl_coef=0.0, entropy=None, entropy_clip=False,
                  entropy_adv_coef=0.0) -> tuple[torch.Tensor, dict]:
    """Dual-clip PPO on per-leaf rows: logp/old_logp/mask [R, T] (T = targets per row), advantages [R].

    Options as in `arpo_kernels.segmented_policy_loss`: k3 KL to `ref_logp`; AEPO entropy-balanced clipping
    (`entropy_clip`) and entropy-aware advantage (`entropy_adv_coef`, z-score over the valid tokens).
    """
    mask_f = mask.to(torch.float32)
    adv = advantages.to(torch.float32)[:, None].expand_as(logp)
    if entropy_adv_coef:
        h = entropy.detach().float()
        n = mask_f.sum().clamp(min=1e-12)
        mean = (h * mask_f).sum() / n
        std = (((h - mean) ** 2) * mask_f).sum().div(n).sqrt()
        adv = adv * (1.0 + entropy_adv_coef * (h - mean) / (std + 1e-6))
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    r_clip = torch.clamp(ratio, lo, hi)
    if entropy_clip:
        r_clip = torch.where(ratio > hi, hi / ratio.detach() * ratio, r_clip)
    loss1, loss2 = -adv * ratio, -adv * r_clip
    clipped1 = torch.maximum(loss1, loss2)
    clipped2 = torch.minimum(-adv * dual_clip, clipped1)
    per_token = torch.where(adv < 0, clipped2, clipped1)
    loss = aggregate(per_token, mask_f, aggregation)
    kl = None
    if ref_logp is not None:
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
        loss = loss + kl_coef * aggregate(kl, mask_f, aggregation)
    with torch.no_grad():
        n = mask_f.sum().clamp(min=1e-12)
        mean = lambda x: (x.float() * mask_f).sum() / n  # noqa: E731
        metrics = {
            "clip_frac": mean(loss2 > loss1),
            "dual_clip_frac": mean((clipped1 > -adv * dual_clip) & (adv < 0)),
            "approx_kl": mean(-neg_kl),
        }
        if kl is not None:
            metrics["kl"] = mean(kl)
        if entropy is not None:
            metrics["entropy"] = mean(entropy)
    return loss, metrics
