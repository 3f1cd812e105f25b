"""Per-token log-prob and entropy of `softmax(logits / T)` in one pass over each row.

Why: ARPO needs, for every generated token, its log-prob (the PPO ratio) and the entropy of the distribution it
was sampled from (the branching signal). The naive way materialises `log_softmax` over `[tokens, V]` in fp32 —
for Qwen2.5 (V = 151,936) that is ~10 GB per copy at 16k tokens, and autograd keeps several. Here each row is
streamed in blocks with an online log-sum-exp; only two floats per row (lse and entropy) are kept for backward,
which recomputes the softmax.

Definitions, with z = logits / T, p = softmax(z), lse = logsumexp(z):
    logprob = z[target] - lse
    entropy = -sum_j p_j log p_j = lse - sum_j p_j z_j
Gradients (derived once, used by both backends):
    d logprob / d z_j = [j == target] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)
    d / d logits = (1 / T) d / d z
Entries equal to -inf (a masked vocabulary) have p = 0 and contribute nothing. Rows whose target equals
`ignore_index` give 0 for both outputs and receive no gradient.

Backends (one dispatch point, `_backend.backend_for`): Triton kernels on CUDA or under TRITON_INTERPRET=1;
elsewhere PyTorch with the same recompute-in-backward structure: the chunk bodies fused by torch.compile
(`token_stats_compiled`, the CPU default) or, where compiling is off or impossible, eager ops chunked over rows.
`token_logprobs_entropy_reference` is the plain PyTorch definition the tests compare against.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from arpo_kernels import token_stats_compiled
from arpo_kernels._backend import use_triton

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per chunk on the PyTorch path: bounds the fp32 temporaries to about this many elements.
_TORCH_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: one program per row, the vocabulary streamed in BLOCK_V chunks.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr, stride_row, targets_ptr, logprob_ptr, entropy_ptr, lse_ptr,
    V, inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_row
    # Running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m): shifting by m keeps t well conditioned
    # even at |z| ~ 1e4, so entropy = log s - t / s loses no precision to cancellation.
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        d = tl.where(e > 0.0, z - m_safe, 0.0)
        # t is relative to the old max; re-centre it on the new one before adding this block.
        shift = tl.where(m == -float("inf"), 0.0, m - m_safe)
        t = alpha * (t + shift * s)
        s = alpha * s + tl.sum(e, axis=0)
        t = t + tl.sum(e * d, axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    tl.store(logprob_ptr + row, z_target - lse)
    tl.store(entropy_ptr + row, tl.log(s) - t / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr, stride_row, grad_ptr, grad_stride_row, targets_ptr, lse_ptr, entropy_ptr,
    grad_logprob_ptr, grad_entropy_ptr,
    V, inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    grad_row = grad_ptr + row * grad_stride_row
    if target == ignore_index:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=offs < V)
        return
    row_ptr = logits_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_lp = tl.load(grad_logprob_ptr + row)
    g_h = tl.load(grad_entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_temperature
        logp = z - lse
        p = tl.exp(logp)
        ent_term = p * (tl.where(p > 0.0, logp, 0.0) + entropy)
        g = g_lp * (tl.where(offs == target, 1.0, 0.0) - p) - g_h * ent_term
        tl.store(grad_row + offs, (g * inv_temperature).to(grad_ptr.dtype.element_ty), mask=offs < V)


# (BLOCK_V, num_warps) for the row kernels on CUDA; tuned on an H100 (benchmarks/tune_token_stats.py).
CUDA_LAUNCH = {"fwd": (4096, 4), "bwd": (4096, 16)}


def _launch(V: int, which: str, on_cuda: bool) -> dict:
    if not on_cuda:  # the interpreter: small blocks keep numpy temporaries small
        return {"BLOCK_V": max(16, min(triton.next_power_of_2(V), 1024))}
    block, warps = CUDA_LAUNCH[which]
    return {"BLOCK_V": max(16, min(triton.next_power_of_2(V), block)), "num_warps": warps}


def _stats_fwd_triton(logits2d: torch.Tensor, targets1d: torch.Tensor, temperature: float, ignore_index: int):
    n, V = logits2d.shape
    assert n == 0 or V == 1 or logits2d.stride(1) == 1, "logits rows must be contiguous"
    out = torch.empty((3, n), dtype=torch.float32, device=logits2d.device)
    if n:
        _token_stats_fwd_kernel[(n,)](
            logits2d, logits2d.stride(0), targets1d, out[0], out[1], out[2],
            V, 1.0 / temperature, ignore_index, **_launch(V, "fwd", logits2d.is_cuda),
        )
    return out[0], out[1], out[2]


def _stats_bwd_triton(logits2d, targets1d, lse, entropy, g_lp, g_h, temperature, ignore_index, out=None):
    n, V = logits2d.shape
    grad = torch.empty_like(logits2d) if out is None else out
    assert n == 0 or V == 1 or grad.stride(1) == 1, "gradient rows must be contiguous"
    if n:
        _token_stats_bwd_kernel[(n,)](
            logits2d, logits2d.stride(0), grad, grad.stride(0), targets1d, lse, entropy,
            g_lp.contiguous(), g_h.contiguous(), V, 1.0 / temperature, ignore_index,
            **_launch(V, "bwd", logits2d.is_cuda),
        )
    return grad


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path: the same recompute-in-backward structure, chunked over rows to bound temporaries.
# ----------------------------------------------------------------------------------------------------------------
def _chunk_rows(V: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMENTS // max(V, 1))


def _stats_fwd_torch(logits2d, targets1d, temperature, ignore_index):
    n, V = logits2d.shape
    logprob = torch.zeros(n, dtype=torch.float32, device=logits2d.device)
    entropy = torch.zeros_like(logprob)
    lse_all = torch.zeros_like(logprob)
    step = _chunk_rows(V)
    zero = torch.zeros((), device=logits2d.device)
    for a in range(0, n, step):
        z = logits2d[a:a + step].float()
        if temperature != 1.0:
            z = z / temperature
        tgt = targets1d[a:a + step]
        valid = tgt != ignore_index
        logp = torch.log_softmax(z, dim=-1)
        ent = (logp.exp() * logp).sum(-1).neg_()
        masked = ent.isnan()  # rows with -inf logits: 0 * -inf; redo just those rows with p log p := 0 at p = 0
        if bool(masked.any()):
            lm = logp[masked]
            ent[masked] = -(lm.exp() * lm.masked_fill(lm == -float("inf"), 0.0)).sum(-1)
        lp = logp.gather(1, tgt.clamp(0, V - 1)[:, None].long())[:, 0]
        lse = z.gather(1, tgt.clamp(0, V - 1)[:, None].long())[:, 0] - lp
        logprob[a:a + step] = torch.where(valid, lp, zero)
        entropy[a:a + step] = torch.where(valid, ent, zero)
        lse_all[a:a + step] = torch.where(valid, lse, zero)
    return logprob, entropy, lse_all


def _stats_bwd_torch(logits2d, targets1d, lse, entropy, g_lp, g_h, temperature, ignore_index, out=None):
    n, V = logits2d.shape
    grad = torch.empty_like(logits2d) if out is None else out
    step = _chunk_rows(V)
    for a in range(0, n, step):
        b = min(a + step, n)
        z = logits2d[a:b].float()
        if temperature != 1.0:
            z = z / temperature
        tgt = targets1d[a:b].long()
        valid = (tgt != ignore_index).float()
        gl, gh = g_lp[a:b] * valid, g_h[a:b] * valid
        logp = z - lse[a:b, None]  # a new tensor: z may alias the caller's logits
        # d/dz = g_lp (onehot - p) - g_h p (log p + H) = p * (-(g_lp + g_h H) - g_h log p) + g_lp onehot
        coeff = torch.addcmul((-(gl + gh * entropy[a:b]))[:, None], logp, -gh[:, None])
        g = coeff.mul_(logp.exp_()).nan_to_num_(nan=0.0)  # p = 0 at -inf logits gives 0 * inf
        g.scatter_add_(1, tgt.clamp(0, V - 1)[:, None], gl[:, None])
        if temperature != 1.0:
            g.div_(temperature)
        grad[a:b] = g
    return grad


def stats_forward(logits2d, targets1d, temperature, ignore_index):
    """(logprob, entropy, lse) per row of a 2-D logits tensor, on the dispatched backend."""
    if use_triton(logits2d):
        return _stats_fwd_triton(logits2d, targets1d, temperature, ignore_index)
    if token_stats_compiled.available():
        return token_stats_compiled.stats_forward(logits2d, targets1d, temperature, ignore_index)
    return _stats_fwd_torch(logits2d, targets1d, temperature, ignore_index)


def stats_backward(logits2d, targets1d, lse, entropy, g_lp, g_h, temperature, ignore_index, out=None):
    """d(loss)/d(logits) for one chunk of rows, given the upstream gradients of logprob and entropy."""
    if use_triton(logits2d):
        fn = _stats_bwd_triton
    elif token_stats_compiled.available():
        fn = token_stats_compiled.stats_backward
    else:
        fn = _stats_bwd_torch
    return fn(logits2d, targets1d, lse, entropy, g_lp, g_h, temperature, ignore_index, out)


# ----------------------------------------------------------------------------------------------------------------
# Validation, autograd, public API.
# ----------------------------------------------------------------------------------------------------------------
def check_targets(targets: torch.Tensor, V: int, ignore_index: int, expected_shape: torch.Size) -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.shape != expected_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits' leading shape "
                         f"{tuple(expected_shape)}")
    if targets.numel():
        valid = targets[targets != ignore_index]
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= V:
                bad = hi if hi >= V else lo
                raise ValueError(f"target id {bad} is out of range for vocabulary size {V} "
                                 f"(ignore_index={ignore_index})")


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, targets1d, temperature, ignore_index):
        logprob, entropy, lse = stats_forward(logits2d, targets1d, temperature, ignore_index)
        ctx.save_for_backward(logits2d, targets1d, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.mark_non_differentiable(lse)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits2d, targets1d, lse, entropy = ctx.saved_tensors
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()
        g_h = torch.zeros_like(lse) if g_h is None else g_h.float()
        grad = stats_backward(logits2d, targets1d, lse, entropy, g_lp.contiguous(), g_h.contiguous(),
                              ctx.temperature, ctx.ignore_index)
        return grad, None, None, None


def token_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                           ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under `softmax(logits / temperature)`; both fp32 of shape `targets.shape`.

    Differentiable w.r.t. `logits` through either or both outputs; the softmax is recomputed in backward.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    check_targets(targets, V, ignore_index, logits.shape[:-1])
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")
    temperature = check_temperature(temperature)
    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    logprob, entropy = _TokenStats.apply(logits2d, targets.reshape(-1).contiguous(), temperature, int(ignore_index))
    return logprob.view(lead), entropy.view(lead)


def token_logprobs_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition (materialises the full log-softmax); computes in fp32, or fp64 for fp64 input."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(compute) / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=compute, device=logits.device)
    return torch.where(valid, lp, zero), torch.where(valid, entropy, zero)
