"""One policy update on a batch of rollout trees: mini-batches, micro-batches, the segmented loss, AdamW.

The trees of one rollout batch are split into mini-batches of `train.mini_batch_prompts` prompts (one optimiser
step each, `algo.ppo_epochs` passes). A mini-batch is tree-packed (`arpo.algo.pack_trees`: each shared token
forwarded once, tree attention, depth positions) in micro-batches of about `train.micro_batch_tokens`
packed tokens whose gradients accumulate. The aggregation weights (token-mean, ...) are computed once over the
whole mini-batch and sliced per micro-batch — the loss kernel's per-token coefficients are exact for any split —
so the accumulated gradient equals that of one forward over the mini-batch. The loss comes straight from the
hidden states (`linear_token_loss`: no [tokens, V] logits, each chunk's gradient taken in its forward).

Data-parallel (under torchrun, `arpo.trainer.distributed`): each rank holds its part of every mini-batch; the
weights are normalised over the global mini-batch and FSDP2 sums the gradients, so the update equals the
single-process one; ranks with fewer micro-batches run idle ones (FSDP2's collectives must pair up), and the
metric sums are reduced over ranks before they become means.

Also measured here: the gap between the sampler's log-probs (decode path: paged attention, fused sampler) and the
trainer's recomputation of the same tokens (packed tree forward), on the first mini-batch, before any weight
changes — the two should agree up to kernel rounding, and `logprob_gap/*` says by how much.

Tree attention (`tree_context`): on CUDA the Triton kernel over two int arrays per token (arpo_kernels.tree_attention,
no [T, T] mask); on the CPU the block-sparse per-node SDPA (`tree_blocks`), which measured 1.9x faster than the
dense mask there at 4k packed tokens (benchmarks/RESULTS.md). The dense mask is only the tests' reference.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from arpo.algo import pack_trees
from arpo.model import AttentionContext
from arpo.trainer import distributed as D
from arpo.trainer.sft import autocast
from arpo_kernels import linear_logprobs_entropy, linear_token_loss, segmented_policy_loss
from arpo_kernels.policy_loss import PolicyLossWeights

NO_DUAL_CLIP = 1e30
METRIC_KEYS = ("clip_frac", "dual_clip_frac", "approx_kl", "entropy", "kl")  # token-weighted loss metrics
SUM_KEYS = ("loss", "count", "gap_sum", "gap_n") + METRIC_KEYS


def micro_batches(trees: list, max_tokens: int) -> list[list]:
    """Consecutive groups of trees of at most `max_tokens` packed tokens each (a bigger tree goes alone)."""
    groups, cur, size = [], [], 0
    for tree in trees:
        n = tree.num_unique_tokens()
        if cur and size + n > max_tokens:
            groups.append(cur)
            cur, size = [], 0
        cur.append(tree)
        size += n
    if cur:
        groups.append(cur)
    return groups


def _slice(w: PolicyLossWeights, a: int, b: int, device) -> PolicyLossWeights:
    return PolicyLossWeights(*(t[a:b].to(device) for t in w))


def tree_context(batch) -> AttentionContext:
    """The tree attention a (device-resident) packed batch trains with: interval kernel on CUDA, blocks on CPU."""
    if batch.input_ids.is_cuda:
        return AttentionContext.tree_intervals(*batch.token_intervals())
    return AttentionContext.tree_blocks(*batch.node_blocks())


def _loss_hidden(model, batch, bf16: bool, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict the loss tokens of a packed batch, and the lm_head weight to apply."""
    with autocast(batch.input_ids.device, bf16):
        hidden = model(batch.input_ids, batch.position_ids, ctx)
    w = model.lm_head_weight
    return hidden.index_select(0, batch.pred_index).to(w.dtype), w


def token_stats(model, batch, temperature: float, bf16: bool, ctx: AttentionContext | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, entropy) of the loss tokens of a (device-resident) packed batch under `model`, differentiable.
    `ctx` defaults to `tree_context(batch)`."""
    ctx = tree_context(batch) if ctx is None else ctx
    h, w = _loss_hidden(model, batch, bf16, ctx)
    return linear_logprobs_entropy(h, w, batch.targets, temperature=temperature)


def _loss_kwargs(cfg) -> dict:
    a = cfg.algo
    return {"clip_low": a.clip_low, "clip_high": a.upper_clip(),
            "dual_clip": a.dual_clip if a.dual_clip is not None else NO_DUAL_CLIP,
            "kl_coef": a.kl_coef, "entropy_clip": a.aepo_entropy_clip,
            "entropy_adv_coef": a.aepo_entropy_adv_coef if a.aepo_entropy_advantage else 0.0}


def _chunk_loss(w: PolicyLossWeights, old: torch.Tensor, ref: torch.Tensor | None, cfg, metric_sums: dict):
    """The loss of tokens [a, b): the segmented policy loss (+ KL) minus the entropy bonus, weighted like the loss
    tokens (Σ weight = the aggregation). A sum over tokens, so chunks of it add up to the micro-batch's loss. Each
    call adds its chunk's metrics, weighted by its token count, into `metric_sums` (no second pass for them)."""
    kw, coef = _loss_kwargs(cfg), cfg.algo.entropy_coef

    def loss_fn(lp, ent, a, b):
        wc = PolicyLossWeights(*(t[a:b] for t in w))
        loss, m = segmented_policy_loss(lp, old[a:b], wc, entropy=ent.detach(),
                                        ref_logprobs=None if ref is None else ref[a:b], **kw)
        count = wc.count.float().sum()
        for k, v in m.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v * count
        if coef > 0:
            loss = loss - coef * (wc.weight.float() * ent).sum()
        return loss
    return loss_fn


def micro_loss(model, micro, w: PolicyLossWeights, cfg, temperature: float, ctx: AttentionContext,
               ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(loss, log-prob, entropy, metric sums) of one device-resident packed micro-batch, the loss ready for
    `.backward()`; the metric sums are the loss metrics weighted by token count (0-dim tensors).

    The loss is taken by `linear_token_loss` (each chunk's gradient while its logits exist: three lm_head matmuls
    instead of four) unless AEPO's entropy advantage is on: its z-score spans the micro-batch, so no chunk's
    gradient is known before all entropies are, and the loss goes through the log-probs as a whole. `ref`: the
    reference model's log-probs of the same tokens (KL term)."""
    metric_sums: dict = {}
    loss_fn = _chunk_loss(w, micro.old_logprobs, ref, cfg, metric_sums)
    if _loss_kwargs(cfg)["entropy_adv_coef"]:
        logp, ent = token_stats(model, micro, temperature, cfg.train.bf16, ctx)
        return loss_fn(logp, ent, 0, logp.numel()), logp.detach(), ent.detach(), metric_sums
    h, lm_head = _loss_hidden(model, micro, cfg.train.bf16, ctx)
    return (*linear_token_loss(h, lm_head, micro.targets, loss_fn, temperature=temperature), metric_sums)


def _micro_step(model, ref_model, micro, w, cfg, temperature: float, measure_gap: bool, sums: dict) -> float:
    """Forward + backward of one micro-batch (`micro_loss`); adds weighted metric sums into `sums`, returns the
    largest log-prob gap (0 unless `measure_gap`)."""
    ctx = tree_context(micro)
    ref = None
    if cfg.algo.kl_coef > 0 and ref_model is not None:
        with torch.no_grad():
            ref, _ = token_stats(ref_model, micro, temperature, cfg.train.bf16, ctx)
    loss, logp, _, metric_sums = micro_loss(model, micro, w, cfg, temperature, ctx, ref)
    loss.backward()
    sums["loss"] += float(loss.detach())
    sums["count"] += float(w.count.float().sum())
    for k, v in metric_sums.items():
        sums[k] += float(v)
    if not measure_gap:
        return 0.0
    gap = (logp - micro.old_logprobs).abs()
    sums["gap_sum"] += float(gap.sum())
    sums["gap_n"] += gap.numel()
    return float(gap.max()) if gap.numel() else 0.0


def policy_update(model, trees: list, cfg, optimizer, ref_model=None, *, temperature: float) -> dict:
    """PPO epochs over mini-batches of `trees` (this rank's part of the batch); returns metrics, reduced over
    ranks. `temperature`: the one the rollout sampled `trees` at (its config's), so that the trainer's log-probs
    are of the same distribution. The caller steps the lr scheduler."""
    model.train()
    t = cfg.train
    world = D.world_size()
    per_mini = t.mini_batch_prompts // world
    minis = [trees[i:i + per_mini] for i in range(0, len(trees), per_mini)]
    mode = "hard" if cfg.algo.attribution == "hard" else "soft"
    sums: dict = defaultdict(float)
    gap_max = 0.0
    norms, steps = [], 0
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    for epoch in range(cfg.algo.ppo_epochs):
        for mi, mini in enumerate(minis):
            full = pack_trees(mini, eps=cfg.algo.adv_eps)
            if D.sum_across_ranks([full.targets.numel()])[0] == 0:
                continue
            weights = D.global_loss_weights(full, mode, cfg.algo.aggregation)
            optimizer.zero_grad(set_to_none=True)
            groups = micro_batches(mini, t.micro_batch_tokens)
            k = 0
            for i in range(int(D.max_across_ranks(len(groups)))):
                micro = pack_trees(groups[i], eps=cfg.algo.adv_eps).to(model.device) if i < len(groups) else None
                n = micro.targets.numel() if micro is not None else 0
                if n:
                    w = _slice(weights, k, k + n, model.device)
                    gap_max = max(gap_max, _micro_step(model, ref_model, micro, w, cfg, temperature,
                                                         epoch == 0 and mi == 0, sums))
                elif world > 1:
                    D.idle_micro_step(model, ref_model if cfg.algo.kl_coef > 0 else None)
                k += n
            norms.append(D.clip_grad_norm(model, clip))
            optimizer.step()
            steps += 1
    model.eval()
    # the same keys on every rank (a rank may have had no loss token), and whether any rank had each
    totals = D.sum_across_ranks([sums.get(k, 0.0) for k in SUM_KEYS] + [float(k in sums) for k in SUM_KEYS])
    present = {k for k, p in zip(SUM_KEYS, totals[len(SUM_KEYS):]) if p}
    sums = dict(zip(SUM_KEYS, totals))
    n = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / max(steps, 1), "grad_norm": sum(norms) / max(len(norms), 1),
           "optimizer_steps": steps}
    for key in METRIC_KEYS:
        if key in present:
            out[f"update/{key}"] = sums[key] / n
    if sums["gap_n"]:
        out["logprob_gap/mean_abs"] = sums["gap_sum"] / sums["gap_n"]
        out["logprob_gap/max_abs"] = D.max_across_ranks(gap_max)
    return out
