"""PPO dual-clip policy loss over tree-packed tokens, where one token may stand for several leaves at once.

Why: ARPO trains on rollout trees. Packing each tree's tokens once (arpo.algo.packing) means a shared token must
carry the loss of every leaf that contains it. The dual-clip surrogate of one (token, leaf) pair is linear in the
advantage A once the sign of A is fixed (r = exp(logp − old), lo = 1 − clip_low, hi = 1 + clip_high):
    A ≥ 0:  l = A⁺ · f⁺(r),   f⁺(r) = −min(r, clip(r, lo, hi))           (= −min(r, hi))
    A < 0:  l = |A| · f⁻(r),  f⁻(r) = min(max(r, clip(r, lo, hi)), c)     (= min(max(r, lo), c))
so the weighted sum over the leaves of a token collapses exactly — same value, same gradient — to
    loss_t = pos_t · f⁺(r_t) + neg_t · f⁻(r_t) + kl_coef · weight_t · k3_t,
with pos_t = Σ w_i A_i⁺, neg_t = Σ w_i |A_i⁻|, weight_t = Σ w_i (w_i: the aggregation weight of leaf i). Hard
attribution is the same formula with a single mean advantage per token. The caller builds these coefficients
(`PolicyLossWeights`, one value per token); this file only needs per-token log-probs.

Details, all as in verl (the reference's trainer): the log-ratio is clamped to ±20 before exp; k3 KL to reference
log-probs is exp(ref − logp) − (ref − logp) − 1, with ref − logp clamped to ±20 and k3 clamped to ≤ 10.
Options from AEPO (ARPO.md §6): `entropy_clip` keeps the gradient of the upper clip — value hi, gradient of
hi/sg(r)·r; `entropy_adv_coef` = α scales every advantage by f_t = 1 + α·z(H_t), z a detached z-score of the token
entropies over the loss tokens (population std + 1e-6, each token weighed by its `count`). If f_t < 0 the signs
of its advantages flip, so pos and neg (and count_pos, count_neg) swap roles — still exact.

Metrics (detached, means over the equivalent batch, i.e. weighted by `count`): clip_frac (the clip is active:
A > 0 and r > hi, or A < 0 and r < lo), dual_clip_frac (A < 0 and r > c), approx_kl (mean of old − logp),
entropy (mean, if given), kl (mean k3, if reference log-probs are given).

Backends: the Triton kernel (one program per BLOCK tokens) computes the loss, d loss / d logp and the metric sums
in one pass; backward is a multiply. `segmented_policy_loss_reference` is the literal PyTorch formulation (verl's
min/max/clamp expressions, autograd for the gradient), used on the CPU and by the tests.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import use_triton

_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0
_BLOCK = 1024
_N_STATS = 5  # loss, clipped, dual-clipped, approx-kl numerator, k3 numerator


class PolicyLossWeights(NamedTuple):
    """Per-token coefficients (each a 1-D float tensor of the loss tokens' length).

    pos / neg: Σ over the token's leaves of w_i·max(A_i, 0) / w_i·max(−A_i, 0); weight: Σ w_i (scales KL);
    count / count_pos / count_neg: the token's number of (leaf) copies in the equivalent batch, in all / with
    A > 0 / with A < 0 — weights of the metrics and of the entropy z-score. count = 0 means "not in the loss".
    """

    pos: torch.Tensor
    neg: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    count_pos: torch.Tensor
    count_neg: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: elementwise over tokens, fp32 math, per-program partial sums (deterministic reduction).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, coef_ptr, dlogp_ptr, partial_ptr,
    T, n_programs, lo, hi, dual_clip, kl_coef,
    HAS_REF: tl.constexpr, ENTROPY_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < T
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    pos = tl.load(coef_ptr + offs, mask=valid, other=0.0)
    neg = tl.load(coef_ptr + T + offs, mask=valid, other=0.0)
    weight = tl.load(coef_ptr + 2 * T + offs, mask=valid, other=0.0)
    count = tl.load(coef_ptr + 3 * T + offs, mask=valid, other=0.0)
    count_pos = tl.load(coef_ptr + 4 * T + offs, mask=valid, other=0.0)
    count_neg = tl.load(coef_ptr + 5 * T + offs, mask=valid, other=0.0)

    # r = exp(clamp(logp - old, ±C)); dr/dlogp = r inside the clamp, 0 outside.
    x = logp - old
    x_in = (x >= -20.0) & (x <= 20.0)
    x = tl.minimum(tl.maximum(x, -20.0), 20.0)
    r = tl.exp(x)
    # A > 0: f+ = -min(r, hi). Above hi the value is constant (gradient 0), or hi/sg(r)*r with entropy clipping.
    over = r > hi
    f_pos = tl.where(over, -hi, -r)
    if ENTROPY_CLIP:
        g_pos = tl.where(over, -hi, -r)
    else:
        g_pos = tl.where(over, 0.0, -r)
    # A < 0: f- = min(max(r, lo), c): gradient r on [lo, c], 0 where either bound is active.
    under = r < lo
    v = tl.maximum(r, lo)
    dual = v > dual_clip
    f_neg = tl.where(dual, dual_clip, v)
    g_neg = tl.where(dual | under, 0.0, r)
    loss = pos * f_pos + neg * f_neg
    grad = tl.where(x_in, pos * g_pos + neg * g_neg, 0.0)
    k3 = tl.zeros_like(loss)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        d = ref - logp
        d_in = (d >= -20.0) & (d <= 20.0)
        d = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(d)
        k3_raw = e - d - 1.0
        k3 = tl.minimum(k3_raw, 10.0)
        # d k3 / d logp = -(e - 1) = 1 - e, zero where a clamp is active
        g_k3 = tl.where(d_in & (k3_raw <= 10.0), 1.0 - e, 0.0)
        loss += kl_coef * weight * k3
        grad += kl_coef * weight * g_k3
    tl.store(dlogp_ptr + offs, grad, mask=valid)

    zero = tl.zeros_like(loss)
    tl.store(partial_ptr + pid, tl.sum(tl.where(valid, loss, zero), axis=0))
    clipped = count_pos * over.to(tl.float32) + count_neg * under.to(tl.float32)
    tl.store(partial_ptr + n_programs + pid, tl.sum(tl.where(valid, clipped, zero), axis=0))
    tl.store(partial_ptr + 2 * n_programs + pid,
             tl.sum(tl.where(valid, count_neg * dual.to(tl.float32), zero), axis=0))
    tl.store(partial_ptr + 3 * n_programs + pid, tl.sum(tl.where(valid, count * -x, zero), axis=0))
    tl.store(partial_ptr + 4 * n_programs + pid, tl.sum(tl.where(valid, count * k3, zero), axis=0))


def _launch(logp, old, ref, coef, lo, hi, dual_clip, kl_coef, entropy_clip):
    T = logp.numel()
    n_programs = max(triton.cdiv(T, _BLOCK), 1)
    dlogp = torch.empty(T, dtype=torch.float32, device=logp.device)
    partial = torch.zeros(_N_STATS, n_programs, dtype=torch.float32, device=logp.device)
    if T > 0:
        _policy_loss_fwd_kernel[(n_programs,)](
            logp, old, ref if ref is not None else logp, coef, dlogp, partial,
            T, n_programs, float(lo), float(hi), float(dual_clip), float(kl_coef),
            HAS_REF=ref is not None, ENTROPY_CLIP=bool(entropy_clip), BLOCK=_BLOCK,
        )
    return partial.sum(1), dlogp


class _SegmentedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, coef, lo, hi, dual_clip, kl_coef, entropy_clip):
        sums, dlogp = _launch(logp, old, ref, coef, lo, hi, dual_clip, kl_coef, entropy_clip)
        ctx.save_for_backward(dlogp)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        (dlogp,) = ctx.saved_tensors
        return (dlogp * grad_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Shared host-side pieces: validation, AEPO entropy-aware scaling, metrics.
# ----------------------------------------------------------------------------------------------------------------
def _check(logprobs, old_logprobs, weights, ref_logprobs, entropy, clip_low, clip_high, dual_clip):
    if not isinstance(weights, PolicyLossWeights):
        raise ValueError("weights must be a PolicyLossWeights (pos, neg, weight, count, count_pos, count_neg)")
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D [tokens], got shape {tuple(logprobs.shape)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    named = [("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy)]
    named += [(f"weights.{k}", v) for k, v in weights._asdict().items()]
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(getattr(t, 'shape', ()))}")
        if t.device != logprobs.device:
            raise ValueError(f"{name} is on {t.device} but logprobs is on {logprobs.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not (0.0 <= clip_low < 1.0):
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if not dual_clip > 1.0:
        raise ValueError(f"dual_clip (c) must be > 1, got {dual_clip}")


def entropy_scaled_weights(weights: PolicyLossWeights, entropy: torch.Tensor, coef: float) -> PolicyLossWeights:
    """AEPO entropy-aware advantage: every advantage of token t times f_t = 1 + coef·z(H_t) (z detached)."""
    cnt = weights.count.float()
    h = entropy.detach().float()
    total = cnt.sum().clamp(min=1e-12)
    mean = (cnt * h).sum() / total
    std = ((cnt * (h - mean) ** 2).sum() / total).sqrt()
    f = 1.0 + coef * (h - mean) / (std + 1e-6)
    flip = f < 0
    a = f.abs()
    pos = torch.where(flip, a * weights.neg, a * weights.pos)
    neg = torch.where(flip, a * weights.pos, a * weights.neg)
    cpos = torch.where(flip, weights.count_neg, weights.count_pos)
    cneg = torch.where(flip, weights.count_pos, weights.count_neg)
    return PolicyLossWeights(pos, neg, weights.weight, weights.count, cpos, cneg)


def _metrics(sums: torch.Tensor, weights: PolicyLossWeights, entropy, has_ref: bool) -> dict:
    total = weights.count.float().sum().clamp(min=1e-12)
    out = {
        "clip_frac": sums[1] / total,
        "dual_clip_frac": sums[2] / total,
        "approx_kl": sums[3] / total,
    }
    if has_ref:
        out["kl"] = sums[4] / total
    if entropy is not None:
        out["entropy"] = (weights.count.float() * entropy.detach().float()).sum() / total
    return {k: v.detach() for k, v in out.items()}


def _prepare(logprobs, old_logprobs, weights, ref_logprobs, entropy, entropy_adv_coef, clip_low, clip_high,
             dual_clip):
    _check(logprobs, old_logprobs, weights, ref_logprobs, entropy, clip_low, clip_high, dual_clip)
    if entropy_adv_coef:
        if entropy is None:
            raise ValueError("entropy_adv_coef needs the per-token entropy")
        weights = entropy_scaled_weights(weights, entropy, entropy_adv_coef)
    return PolicyLossWeights(*(w.detach().float() for w in weights))


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def segmented_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, weights: PolicyLossWeights, *,
                          clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float = 3.0,
                          ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                          entropy: torch.Tensor | None = None, entropy_clip: bool = False,
                          entropy_adv_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Loss (0-dim, differentiable w.r.t. `logprobs`) and metrics; all per-token inputs are 1-D of one length.

    `entropy` (optional, detached here) feeds the entropy metric and `entropy_adv_coef`; `ref_logprobs` with
    `kl_coef` adds the k3 KL penalty.
    """
    weights = _prepare(logprobs, old_logprobs, weights, ref_logprobs, entropy, entropy_adv_coef, clip_low,
                       clip_high, dual_clip)
    if not use_triton(logprobs):
        return segmented_policy_loss_reference(logprobs, old_logprobs, weights, clip_low=clip_low,
                                               clip_high=clip_high, dual_clip=dual_clip, ref_logprobs=ref_logprobs,
                                               kl_coef=kl_coef, entropy=entropy, entropy_clip=entropy_clip)
    coef = torch.stack(list(weights)).contiguous()
    old = old_logprobs.detach().contiguous()
    ref = ref_logprobs.detach().contiguous() if ref_logprobs is not None else None
    loss, sums = _SegmentedPolicyLoss.apply(logprobs.contiguous(), old, ref, coef, 1.0 - clip_low, 1.0 + clip_high,
                                            dual_clip, kl_coef if ref is not None else 0.0, entropy_clip)
    return loss, _metrics(sums, weights, entropy, ref is not None)


def segmented_policy_loss_reference(logprobs, old_logprobs, weights: PolicyLossWeights, *, clip_low=0.2,
                                    clip_high=0.2, dual_clip=3.0, ref_logprobs=None, kl_coef=0.0, entropy=None,
                                    entropy_clip=False, entropy_adv_coef=0.0) -> tuple[torch.Tensor, dict]:
    """Plain PyTorch: verl's dual-clip expressions on the per-token coefficients, gradient by autograd."""
    weights = _prepare(logprobs, old_logprobs, weights, ref_logprobs, entropy, entropy_adv_coef, clip_low,
                       clip_high, dual_clip)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    logp = logprobs.float()
    x = torch.clamp(logp - old_logprobs.detach().float(), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    r = torch.exp(x)
    r_clip = torch.clamp(r, lo, hi)
    if entropy_clip:
        r_clip = torch.where(r > hi, hi / r.detach() * r, r_clip)
    f_pos = -torch.minimum(r, r_clip)
    f_neg = torch.clamp(torch.maximum(r, r_clip), max=dual_clip)
    per_token = weights.pos * f_pos + weights.neg * f_neg
    k3 = torch.zeros_like(r)
    has_ref = ref_logprobs is not None
    if has_ref:
        d = torch.clamp(ref_logprobs.detach().float() - logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        k3 = torch.clamp(torch.exp(d) - d - 1.0, max=_K3_CLAMP)
        per_token = per_token + kl_coef * weights.weight * k3
    with torch.no_grad():
        clipped = weights.count_pos * (r > hi) + weights.count_neg * (r < lo)
        dual = weights.count_neg * (torch.maximum(r, torch.full_like(r, lo)) > dual_clip)
        sums = torch.stack([per_token.sum(), clipped.sum(), dual.sum(), (weights.count * -x).sum(),
                            (weights.count * k3).sum()])
    return per_token.sum(), _metrics(sums, weights, entropy, has_ref)


def segmented_policy_loss_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                                      old_logprobs: torch.Tensor, weights: PolicyLossWeights, *,
                                      index: torch.Tensor | None = None, temperature: float = 1.0,
                                      **loss_kwargs) -> tuple[torch.Tensor, dict]:
    """The loss straight from hidden states: log-probs and entropies by `linear_logprobs_entropy` (no logits).

    `index` (optional) selects the rows of `hidden` that predict each target (`PackedBatch.pred_index`), so
    `hidden` may be the model's full packed output. Gradients flow to `hidden` and `lm_head_weight`.
    """
    from arpo_kernels.linear_token_stats import linear_logprobs_entropy

    if index is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    logprobs, entropy = linear_logprobs_entropy(hidden, lm_head_weight, targets, temperature=temperature)
    return segmented_policy_loss(logprobs, old_logprobs, weights, entropy=entropy.detach(), **loss_kwargs)
