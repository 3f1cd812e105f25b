"""A per-token loss straight from hidden states and the lm_head, its gradient taken while the logits are there.

Why: `linear_logprobs_entropy` must recompute every chunk's logits in the backward (four tokens x H x V matmuls:
forward, recompute, two gradients), because autograd only hands it d(log-prob) and d(entropy) after the whole
loss is known. When the loss is a sum of per-token terms — the policy loss, its KL and entropy terms, plain NLL —
the gradient of one chunk's terms is known as soon as that chunk's log-probs and entropies are. Here each chunk
is done in one visit: logits (one matmul), statistics, the chunk's loss and its d(log-prob), d(entropy) (autograd
on the small per-token tensors), d(logits) in place, then `d hidden` and `d W` (two matmuls). Three matmuls
instead of four, and the logits are read while still in cache; the backward only scales the stored gradients.
Extra memory: one chunk of logits, `d hidden` and a `d W` buffer (the weight's size), as the unfused backward.

Not for: a loss whose per-token gradient depends on tokens of other chunks (a z-score over the batch, a
normalisation by a data-dependent sum computed from the log-probs), and double backward.
"""
from __future__ import annotations

from typing import Callable

import torch

from arpo_kernels.linear_token_stats import _chunk_tokens, check_linear_inputs
from arpo_kernels.token_stats import check_temperature, stats_backward, stats_forward

ChunkLoss = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _chunk_grads(loss_fn: ChunkLoss, lp: torch.Tensor, ent: torch.Tensor, a: int, b: int, want: bool):
    """The chunk's loss and, if `want`, its gradient w.r.t. the chunk's log-probs and entropies (zeros where
    unused; None without `want`)."""
    with torch.set_grad_enabled(want):
        lp_leaf = lp.detach().requires_grad_()
        ent_leaf = ent.detach().requires_grad_()
        loss = loss_fn(lp_leaf, ent_leaf, a, b)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element tensor, got "
                             f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
        if not want:
            return loss.detach().float().reshape(()), None, None
        if loss.requires_grad:
            g_lp, g_ent = torch.autograd.grad(loss.reshape(()), (lp_leaf, ent_leaf), allow_unused=True)
        else:
            g_lp = g_ent = None
    g_lp = torch.zeros_like(lp) if g_lp is None else g_lp.float().contiguous()
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.float().contiguous()
    return loss.detach().float().reshape(()), g_lp, g_ent


class _LinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, targets1d, loss_fn, temperature, ignore_index, chunk_elements, grad_on):
        n, V = hidden2d.shape[0], weight.shape[0]
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        logprob = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
        entropy = torch.empty_like(logprob)
        total = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
        grad_hidden = torch.empty_like(hidden2d) if need_h else None
        # d W accumulates in the weight's dtype through addmm (fp32 inside the GEMM), as the unfused backward does
        grad_weight = torch.zeros_like(weight) if need_w else None
        step = _chunk_tokens(n, V, chunk_elements)
        work = hidden2d.new_empty(min(step, n), V) if n else None
        for a in range(0, n, step):
            b = min(a + step, n)
            h, t = hidden2d[a:b], targets1d[a:b]
            logits = torch.matmul(h, weight.t(), out=work[:b - a])
            lp, ent, lse = stats_forward(logits, t, temperature, ignore_index)
            logprob[a:b], entropy[a:b] = lp, ent
            loss, g_lp, g_ent = _chunk_grads(loss_fn, lp, ent, a, b, need_h or need_w)
            total += loss
            if need_h or need_w:
                grad_logits = stats_backward(logits, t, lse, ent, g_lp, g_ent, temperature, ignore_index, out=logits)
                if need_h:
                    torch.matmul(grad_logits, weight, out=grad_hidden[a:b])
                if need_w:
                    grad_weight.addmm_(grad_logits.t(), h)
        # handed over once (not saved tensors): the backward scales them in place and drops them
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(logprob, entropy)
        return total, logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        if ctx.grads is None:
            raise RuntimeError("linear_token_loss: a second backward through the same loss is not supported (its "
                               "gradients were computed in the forward and handed over by the first)")
        grads, ctx.grads = ctx.grads, None
        out = [g.mul_(g_loss.to(g.dtype)) if g is not None else None for g in grads]
        return out[0], out[1], None, None, None, None, None, None


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: ChunkLoss, *,
                      temperature: float = 1.0, ignore_index: int = -100, chunk_elements: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ over token chunks of `loss_fn(logprob, entropy, a, b)` under `softmax(hidden @ weight.T / temperature)`.

    hidden `[..., H]`, weight `[V, H]`, targets `[...]` integer; tokens are taken in the flattened order and
    `loss_fn` gets the fp32 log-probs and entropies of tokens `[a, b)` and returns that chunk's loss (a scalar,
    differentiable w.r.t. both; it may read its own per-token tensors sliced by `a:b`). Returns `(loss, logprob,
    entropy)`: the loss is differentiable w.r.t. `hidden` and `weight` (first order), the two per-token tensors
    (shape `targets.shape`) are detached. The total must be separable over tokens: see the module docstring.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (logprob, entropy, a, b) -> loss, got {type(loss_fn).__name__}")
    chunk_elements = check_linear_inputs(hidden, weight, targets, ignore_index, chunk_elements)
    temperature = check_temperature(temperature)
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    loss, logprob, entropy = _LinearTokenLoss.apply(hidden2d, weight, targets.reshape(-1).contiguous(), loss_fn,
                                                    temperature, int(ignore_index), chunk_elements,
                                                    torch.is_grad_enabled())
    return loss, logprob.view(lead), entropy.view(lead)
