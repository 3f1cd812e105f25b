"""Position-wise ops of a decoder block fused for no-grad forwards (decode steps, prefill): fewer, larger launches.

Why: a decode step of a small model is bound by kernel count, not bytes — PyTorch's RMSNorm is seven elementwise
kernels, rotary five per tensor, SiLU·up two — about 35 launches per layer where 10 do the work. Inside a CUDA
graph each launch still costs a few microseconds of GPU time. These kernels do each op in one pass:

    out, residual = add_rms_norm(x, residual, weight, eps)   # residual' = x + residual; out = RMSNorm(residual')
    out = rms_norm(x, weight, eps)
    q_rot, k_rot = rotary_qk(q, k, cos, sin)                  # "rotate half" RoPE on q and k in one launch
    q_rot, k_rot = rotary_qk(q, k, cos, sin, q_w, k_w, eps)   # Qwen3: per-head RMSNorm, then RoPE, one launch
    out = silu_mul(gate_up)                                   # silu(gate) * up, gate = first half of the rows

Numerics are those of the PyTorch code in `arpo.model.layers` (transformers' Qwen2), including where it rounds to
the activation dtype between ops, so that decoding and training see the same numbers: RMSNorm's statistics in
fp32 and its weight multiplied in the activation dtype; rotary's two products each rounded before their sum;
silu rounded before the multiply. Each function has a `*_reference` twin in plain PyTorch (the CPU path, and
the tests' oracle). Not differentiable: the model uses them only when autograd is off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import use_triton

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ------------------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _rounded(x, ACT: tl.constexpr):
    """fp32 `x` rounded to ACT's precision (nearest, ties to even), kept in fp32.

    Why not `x.to(ACT).to(tl.float32)`: the compiler may fold that round trip away (and fuse what follows into an
    FMA), and Triton's CPU interpreter truncates to bf16 instead of rounding. Integer ops are taken literally."""
    if ACT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # a NaN's payload could carry into the sign
    elif ACT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     n, eps, HAS_RES: tl.constexpr, ACT: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # the residual stream's add, rounded to the activation dtype as the eager `x + residual` is
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = _rounded(x + r, ACT)
        tl.store(res_out_ptr + row * stride_ro + offs, x.to(ACT), mask=mask)
    var = tl.sum(x * x, axis=0) / n
    h = _rounded(x * tl.rsqrt(var + eps), ACT)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _rounded(w * h, OUT).to(OUT), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, stride_qt, stride_qh, stride_kt,
                   stride_kh, stride_ct, stride_st, eps, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr, ACT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, HALF_PAD)
    mask = offs < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if head < HQ:
        src = q_ptr + t * stride_qt + head * stride_qh
        dst = qo_ptr + (t * HQ + head) * (2 * HALF)
        w_ptr = qw_ptr
    else:
        src = k_ptr + t * stride_kt + (head - HQ) * stride_kh
        dst = ko_ptr + (t * HKV + head - HQ) * (2 * HALF)
        w_ptr = kw_ptr
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # the head's RMSNorm first (Qwen3's q_norm / k_norm), rounded where rms_norm_reference rounds
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = _rounded(w1 * _rounded(x1 * rstd, ACT), ACT)
        x2 = _rounded(w2 * _rounded(x2 * rstd, ACT), ACT)
    # x * cos + rotate_half(x) * sin, each product rounded as the eager code rounds it
    o1 = _rounded(_rounded(x1 * c1, ACT) + _rounded(-x2 * s1, ACT), ACT).to(ACT)
    o2 = _rounded(_rounded(x2 * c2, ACT) + _rounded(x1 * s2, ACT), ACT).to(ACT)
    tl.store(dst + offs, o1, mask=mask)
    tl.store(dst + HALF + offs, o2, mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    s = _rounded(g / (1.0 + tl.exp(-g)), ACT)
    tl.store(out_ptr + row * stride_o + offs, _rounded(s * u, ACT).to(ACT), mask=mask)


def _rms_norm_triton(x, weight, eps, residual):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    rows = x2.shape[0]
    has_res = residual is not None
    r2 = residual.reshape(-1, n) if has_res else x2
    res_out = torch.empty_like(x2, memory_format=torch.contiguous_format) if has_res else out
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                  res_out.stride(0), n, eps, HAS_RES=has_res, ACT=_TL[x.dtype],
                                  OUT=_TL[out_dtype], BLOCK=block, num_warps=min(16, max(1, block // 256)))
    out = out.view(x.shape)
    return (out, res_out.view(x.shape)) if has_res else out


def _rotary_triton(q, k, cos, sin, q_weight=None, k_weight=None, eps=0.0):
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if t:
        half = d // 2
        has_norm = q_weight is not None
        qw, kw = (q_weight, k_weight) if has_norm else (cos, cos)  # unread without the norm
        _rotary_kernel[(t, hq + hkv)](q, k, cos, sin, q_out, k_out, qw, kw, q.stride(0), q.stride(1), k.stride(0),
                                      k.stride(1), cos.stride(0), sin.stride(0), eps, HQ=hq, HKV=hkv, HALF=half,
                                      HALF_PAD=triton.next_power_of_2(half), HAS_NORM=has_norm,
                                      ACT=_TL[q.dtype], num_warps=1)
    return q_out, k_out


def _silu_mul_triton(x):
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, x2.stride(0), out.stride(0), inter,
                                                                    ACT=_TL[x.dtype], BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)


# ------------------------------------------------------------------------------------------------------------
# PyTorch references (the eager code of arpo.model.layers, op for op)
# ------------------------------------------------------------------------------------------------------------
def rms_norm_reference(x, weight, eps):
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm_reference(x, residual, weight, eps):
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


def rotary_reference(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul_reference(x):
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ------------------------------------------------------------------------------------------------------------
# Public
# ------------------------------------------------------------------------------------------------------------
_MAX_ROW = 65536  # one program holds a whole RMSNorm row; wider rows take the reference path


def _check_rows(name: str, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Dtype and width checks; returns `x` with a unit last stride (the kernels index rows by stride)."""
    if x.dtype not in _TL:
        raise ValueError(f"{name} dtype {x.dtype} is not supported (float32, bfloat16, float16)")
    if n is not None and x.shape[-1] != n:
        raise ValueError(f"{name} last dimension {x.shape[-1]} != {n}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _rms_norm_torch(x, weight, eps):
    """The PyTorch path: in fp32 the reference's arithmetic is ATen's fused `rms_norm` (one pass instead of six
    ops); other dtypes round `h` before the weight, which `F.rms_norm` does not, so they take the reference."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (statistics in fp32, weight applied in the activation dtype)."""
    if not use_triton(x) or x.shape[-1] > _MAX_ROW:
        return _rms_norm_torch(x, weight, eps)
    return _rms_norm_triton(_check_rows("x", x, weight.shape[0]), weight.contiguous(), eps, None)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual), x + residual): the residual stream's add fused into the next norm."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {tuple(x.shape)}/{x.dtype} and residual {tuple(residual.shape)}/{residual.dtype} "
                         "must match")
    if not use_triton(x) or x.shape[-1] > _MAX_ROW:
        residual = x + residual
        return _rms_norm_torch(residual, weight, eps), residual
    return _rms_norm_triton(_check_rows("x", x, weight.shape[0]), weight.contiguous(), eps,
                            _check_rows("residual", residual))


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (strided views of a fused qkv output are fine) by cos/sin [T, D];
    returns new contiguous tensors. With `q_weight`/`k_weight` [D], each head is first RMS-normalised with that
    weight (Qwen3's q_norm / k_norm) in the same pass: `rotary(rms_norm(q, q_weight, eps))`."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("rotary_qk: pass both q_weight and k_weight, or neither")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or cos.shape != (q.shape[0], q.shape[2]) \
            or sin.shape != cos.shape:
        raise ValueError(f"rotary_qk: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)} do not fit [T, H, D], [T, D]")
    if q.shape[2] % 2:
        raise ValueError(f"rotary needs an even head_dim, got {q.shape[2]}")
    has_norm = q_weight is not None
    if has_norm and (q_weight.shape != (q.shape[2],) or k_weight.shape != (q.shape[2],)):
        raise ValueError(f"rotary_qk: q_weight {tuple(q_weight.shape)} / k_weight {tuple(k_weight.shape)} must be "
                         f"[{q.shape[2]}]")
    if not use_triton(q) or (has_norm and (q_weight.dtype != q.dtype or k_weight.dtype != q.dtype)):
        if has_norm:
            q, k = _rms_norm_torch(q, q_weight, eps), _rms_norm_torch(k, k_weight, eps)
        return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    if k.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from k dtype {k.dtype}")
    q, k, cos, sin = (_check_rows(name, x) for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)))
    if has_norm:
        return _rotary_triton(q, k, cos, sin, q_weight.contiguous(), k_weight.contiguous(), eps)
    return _rotary_triton(q, k, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [..., 2 * I] holding gate then up."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_mul needs an even last dimension (gate | up), got {x.shape[-1]}")
    if not use_triton(x):
        return silu_mul_reference(x)
    return _silu_mul_triton(_check_rows("x", x))
