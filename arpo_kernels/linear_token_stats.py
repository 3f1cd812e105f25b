"""Log-prob and entropy straight from hidden states and the lm_head: logits exist only one chunk at a time.

Why: the trainer needs per-token log-probs and entropies of `hidden @ weight.T`, and the `[tokens, V]` logits
(plus their fp32 log-softmax, plus what autograd keeps) are the largest tensors of an RL step. Here the tokens
are processed in chunks: for each chunk the logits are produced by one matmul (cuBLAS / MKL, the fastest there
is), reduced to two floats per row by the row-statistics kernel of `token_stats`, and dropped. Backward
recomputes each chunk's logits, turns them into d(logits) in place with the same kernel family, and
accumulates `d hidden = d logits @ W` and `d W += d logits^T @ hidden`.

Cost: four matmuls of size tokens x H x V (forward, recompute, two gradients) instead of three, in exchange for
peak extra memory of one chunk (`chunk_tokens x V`) instead of several `tokens x V` tensors. The chunk size adapts
to V so that a chunk holds about `chunk_elements` logits.
"""
from __future__ import annotations

import torch

from arpo_kernels.token_stats import (
    _FLOAT_DTYPES,
    check_targets,
    check_temperature,
    stats_backward,
    stats_forward,
)

_DEFAULT_CHUNK_ELEMENTS = None  # per device: see _default_chunk_elements
_DEFAULT_CPU_CHUNK_ELEMENTS = 1 << 24
_DEFAULT_CPU_KEEP_ELEMENTS = 0


def _default_chunk_elements(device: torch.device) -> int:
    # GPU: 256M logits (512 MiB in bf16, ~1.7k tokens at V = 152k) keep the matmuls at full speed and the
    # number of d W accumulations small; CPU: 4M fit caches better and bound memory.
    return 1 << 28 if device.type == "cuda" else _DEFAULT_CPU_CHUNK_ELEMENTS


def _default_keep_elements(device: torch.device) -> int:
    return _DEFAULT_CPU_KEEP_ELEMENTS if device.type != "cuda" else 0


def _chunk_tokens(n: int, V: int, chunk_elements: int) -> int:
    return max(1, min(n, chunk_elements // max(V, 1)))


def _logits_chunk(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return h @ weight.t()


def check_linear_inputs(hidden, weight, targets, ignore_index: int, chunk_elements: int | None) -> int:
    """Validate the inputs of the lm_head-fused functions (shapes, dtypes, device, targets); returns the chunk
    size in logits (default per device)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor of shape [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, H], got shape {tuple(getattr(weight, 'shape', ()))}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[-1]} but weight is "
                         f"[V={weight.shape[0]}, H={weight.shape[1]}]")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    check_targets(targets, weight.shape[0], ignore_index, hidden.shape[:-1])
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
                         "must be on one device")
    if chunk_elements is None:
        chunk_elements = _default_chunk_elements(hidden.device)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    return int(chunk_elements)


class _LinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, targets1d, temperature, ignore_index, chunk_elements, keep_elements):
        n = hidden2d.shape[0]
        V = weight.shape[0]
        logprob = torch.empty(n, dtype=torch.float32, device=hidden2d.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)
        step = _chunk_tokens(n, V, chunk_elements)
        starts = range(0, n, step)
        first_kept = len(starts) - keep_elements // (step * V)  # the last chunks that fit the budget stay
        kept = {}
        for i, a in enumerate(starts):
            logits = _logits_chunk(hidden2d[a:a + step], weight)
            lp, ent, ls = stats_forward(logits, targets1d[a:a + step], temperature, ignore_index)
            logprob[a:a + step], entropy[a:a + step], lse[a:a + step] = lp, ent, ls
            if i >= first_kept:
                kept[a] = logits
            del logits
        ctx.save_for_backward(hidden2d, weight, targets1d, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.step, ctx.kept = temperature, ignore_index, step, kept
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden2d, weight, targets1d, lse, entropy = ctx.saved_tensors
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_h = torch.zeros_like(lse) if g_h is None else g_h.float().contiguous()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden2d) if need_h else None
        # d W accumulates in the weight's dtype through addmm (fp32 inside the GEMM, one rounding per chunk), as
        # Liger-Kernel does; an fp32 buffer would cost 2 x |W| extra memory and a pass over it per chunk.
        grad_weight = torch.zeros_like(weight) if need_w else None
        n, step = hidden2d.shape[0], ctx.step
        # one chunk buffer: recomputed logits become their gradient in place; a kept chunk's gradient is written
        # here too, so that the kept logits stay intact for a second backward (retain_graph)
        work = hidden2d.new_empty(min(step, n), weight.shape[0]) if n else None
        for a in range(0, n, step):
            h = hidden2d[a:a + step]
            buf = work[:h.shape[0]]
            logits = ctx.kept.get(a)
            if logits is None:
                logits = torch.matmul(h, weight.t(), out=buf)
            grad_logits = stats_backward(logits, targets1d[a:a + step], lse[a:a + step], entropy[a:a + step],
                                         g_lp[a:a + step], g_h[a:a + step], ctx.temperature, ctx.ignore_index,
                                         out=buf)
            if need_h:
                torch.matmul(grad_logits, weight, out=grad_hidden[a:a + step])
            if need_w:
                grad_weight.addmm_(grad_logits.t(), h)
            del logits, grad_logits
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0, ignore_index: int = -100,
                            chunk_elements: int | None = _DEFAULT_CHUNK_ELEMENTS,
                            keep_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under `softmax(hidden @ weight.T / temperature)`, never storing all logits.

    hidden `[..., H]`, weight `[V, H]`, targets `[...]` integer. Returns fp32 `(logprob, entropy)` of shape
    `targets.shape`; differentiable w.r.t. `hidden` and `weight`. `chunk_elements`: logits per chunk (default per
    device); `keep_elements`: how many logits the forward may keep for the backward instead of recomputing them
    (whole chunks, the last ones; default per device, 0 on CUDA).
    """
    chunk_elements = check_linear_inputs(hidden, weight, targets, ignore_index, chunk_elements)
    if keep_elements is None:
        keep_elements = _default_keep_elements(hidden.device)
    if keep_elements < 0:
        raise ValueError(f"keep_elements must be >= 0, got {keep_elements}")
    temperature = check_temperature(temperature)
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    logprob, entropy = _LinearTokenStats.apply(hidden2d, weight, targets.reshape(-1).contiguous(), temperature,
                                               int(ignore_index), int(chunk_elements), int(keep_elements))
    return logprob.view(lead), entropy.view(lead)


def linear_logprobs_entropy_reference(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Plain PyTorch: materialise the logits, then the reference log-softmax statistics."""
    from arpo_kernels.token_stats import token_logprobs_entropy_reference

    return token_logprobs_entropy_reference(hidden @ weight.t(), targets, temperature, ignore_index)
