"""Tree attention for training, forward and backward, with no [T, T] mask: FlashAttention-2 over interval tests.

Why: a tree-packed micro-batch (arpo.algo.packing) attends each token to its own node's earlier tokens and to
every token of the node's ancestors. As a dense bool mask that is T² entries per forward (256 M at 16k tokens),
and SDPA cannot take its flash path with it, while the real work is Σ(node length × path length). Here the tree
is two small int arrays per token, and the kernel skips every tile with nothing to attend to.

Definition. Number the nodes of the packed forest in depth-first pre-order; `enter[t]` is the pre-order index of
token t's node and `exit[t]` the largest pre-order index in that node's subtree (so a node's subtree is the
index interval [enter, exit], and different trees have disjoint intervals). With the packing's order (a node's
rows come after all of its ancestors' rows):

    key j is visible to query i  ⇔  j ≤ i  and  enter[j] ≤ enter[i] ≤ exit[j]

(the interval test says j's node is an ancestor-or-self of i's; j ≤ i is causality inside the node and removes
nothing from the ancestors). Every query sees itself, so no row is empty.
    out[i, h] = Σ_j softmax_j(scale · q[i, h] · k[j, h // G]) v[j, h // G] over the visible j, G = Hq / Hkv (GQA).

Kernels (one program per (tile, head), fp32 online softmax in the exp2 domain, the scale folded in):
- `_tree_attn_fwd_kernel`: a query tile walks the key tiles up to its diagonal and skips those whose interval
  summary (min enter, max exit over the tile, computed on the host: O(T / BLOCK) ints) cannot meet the query
  tile's [min enter, max enter]; stores out and the row log-sum-exp (base 2) for the backward.
- `_tree_attn_dkdv_kernel`: a key tile (one KV head) walks the query tiles from its diagonal on, for each query
  head of its group, with the same skip test the other way round; accumulates dk, dv without atomics.
- `_tree_attn_dq_kernel`: a query tile walks the key tiles as the forward does; accumulates dq.
Gradients (P = softmax, dP = dO Vᵀ, Δᵢ = Σ_d O·dO): dV = Pᵀ dO, dS = P ⊙ (dP − Δ), dQ = scale · dS K,
dK = scale · dSᵀ Q.

Head dims up to 256 (64 and 128 are the targets; smaller ones pad to 16 for `tl.dot`), fp32 / fp16 / bf16 inputs.
fp32 dots use IEEE precision (exact to the reference at 1e-5); bf16/fp16 dots use tensor cores with fp32
accumulation. Triton's interpreter cannot compute in bf16, so under TRITON_INTERPRET=1 tiles are upcast to fp32.

`tree_attention_reference` is the plain-PyTorch definition (the dense mask built from the same arrays, fp32
math, autograd for the gradient); it is also the PyTorch path of `tree_attention` off CUDA. The trainer's CPU
path does not use it: the block-sparse `AttentionContext.tree_blocks` measured faster there (benchmarks/RESULTS.md).

Pending (GPU work, not measured yet): the launch configuration (BLOCK_M / BLOCK_N / warps / stages) is a first
guess, and whether this kernel or `torch.nn.attention.flex_attention` with a block mask built from the same
arrays is faster at 16k tokens (issue 22's target: ≥ 5× SDPA with the dense mask) has not been measured.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import interpreting, use_triton

LOG2E = 1.4426950408889634
_INT_MAX = 2**31 - 1
# CUDA launch knobs, a first guess (untuned: no GPU measurement yet). The interpreter uses 16 x 16 tiles.
LAUNCH = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _visible(offs_m, offs_n, q_in, k_in, k_out, T):
    """[M, N] bool: key offs_n visible to query offs_m (module docstring), both in range."""
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < T) & (offs_n[None, :] <= offs_m[:, None])
    return ok & (k_in[None, :] <= q_in[:, None]) & (q_in[:, None] <= k_out[None, :])


@triton.jit
def _load_rows(ptr, offs, stride_t, head_off, offs_d, T, D: tl.constexpr, UPCAST: tl.constexpr):
    """[len(offs), D_PAD] rows of one head (zeros past T and D), fp32 under the interpreter."""
    mask = (offs < T)[:, None] & (offs_d < D)[None, :]
    x = tl.load(ptr + offs.to(tl.int64)[:, None] * stride_t + head_off + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(ptr, x, offs, stride_t, head_off, offs_d, T, D: tl.constexpr):
    mask = (offs < T)[:, None] & (offs_d < D)[None, :]
    tl.store(ptr + offs.to(tl.int64)[:, None] * stride_t + head_off + offs_d[None, :],
             x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_intervals(enter_ptr, exit_ptr, offs_n, T):
    """enter / exit of key tokens; past T they are (INT_MAX, -1): visible to nothing."""
    k_in = tl.load(enter_ptr + offs_n, mask=offs_n < T, other=2147483647)
    k_out = tl.load(exit_ptr + offs_n, mask=offs_n < T, other=-1)
    return k_in, k_out


@triton.jit
def _query_intervals(enter_ptr, offs_m, T):
    """enter of query tokens (-1 past T) and the tile's [min, max] over its real rows."""
    q_in = tl.load(enter_ptr + offs_m, mask=offs_m < T, other=-1)
    return q_in, tl.min(tl.where(offs_m < T, q_in, 2147483647), 0), tl.max(q_in, 0)


@triton.jit
def _tree_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, enter_ptr, exit_ptr, tile_in_ptr, tile_out_ptr, o_ptr, lse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, T, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(q_ptr, offs_m, stride_qt, h * stride_qh, offs_d, T, D, UPCAST)
    q_in, q_lo, q_hi = _query_intervals(enter_ptr, offs_m, T)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(0, tl.minimum((tile + 1) * BLOCK_M, T), BLOCK_N):
        t_in = tl.load(tile_in_ptr + n0 // BLOCK_N)
        t_out = tl.load(tile_out_ptr + n0 // BLOCK_N)
        if (t_in <= q_hi) & (t_out >= q_lo):  # else no key of the tile is an ancestor of a query of ours
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_ptr, offs_n, stride_kt, kvh * stride_kh, offs_d, T, D, UPCAST)
            v = _load_rows(v_ptr, offs_n, stride_vt, kvh * stride_vh, offs_d, T, D, UPCAST)
            k_in, k_out = _key_intervals(enter_ptr, exit_ptr, offs_n, T)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(_visible(offs_m, offs_n, q_in, k_in, k_out, T), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows have l = 0
    _store_rows(o_ptr, acc / l_safe[:, None], offs_m, stride_ot, h * stride_oh, offs_d, T, D)
    tl.store(lse_ptr + h * T + offs_m, m_i + tl.log2(l_safe), mask=offs_m < T)


@triton.jit
def _tree_attn_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, enter_ptr, exit_ptr, tile_lo_ptr, tile_hi_ptr,
    dk_ptr, dv_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, T, qk_scale, scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = _load_rows(k_ptr, offs_n, stride_kt, kvh * stride_kh, offs_d, T, D, UPCAST)
    v = _load_rows(v_ptr, offs_n, stride_vt, kvh * stride_vh, offs_d, T, D, UPCAST)
    k_in, k_out = _key_intervals(enter_ptr, exit_ptr, offs_n, T)
    k_lo = tl.min(k_in, 0)
    k_hi = tl.max(k_out, 0)

    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    start = (tile * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the tile's first key see none of it
    for g in range(GROUP):
        h = kvh * GROUP + g
        for m0 in range(start, T, BLOCK_M):
            t_lo = tl.load(tile_lo_ptr + m0 // BLOCK_M)  # min / max enter over the query tile
            t_hi = tl.load(tile_hi_ptr + m0 // BLOCK_M)
            if (t_hi >= k_lo) & (t_lo <= k_hi):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q = _load_rows(q_ptr, offs_m, stride_qt, h * stride_qh, offs_d, T, D, UPCAST)
                do = _load_rows(do_ptr, offs_m, stride_dot, h * stride_doh, offs_d, T, D, UPCAST)
                q_in = tl.load(enter_ptr + offs_m, mask=offs_m < T, other=-1)
                lse = tl.load(lse_ptr + h * T + offs_m, mask=offs_m < T, other=0.0)
                delta = tl.load(delta_ptr + h * T + offs_m, mask=offs_m < T, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(_visible(offs_m, offs_n, q_in, k_in, k_out, T), tl.exp2(s - lse[:, None]), 0.0)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)

    _store_rows(dk_ptr, dk * scale, offs_n, stride_dkt, kvh * stride_dkh, offs_d, T, D)
    _store_rows(dv_ptr, dv, offs_n, stride_dkt, kvh * stride_dkh, offs_d, T, D)


@triton.jit
def _tree_attn_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, enter_ptr, exit_ptr, tile_in_ptr, tile_out_ptr, dq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, T, qk_scale, scale,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _load_rows(q_ptr, offs_m, stride_qt, h * stride_qh, offs_d, T, D, UPCAST)
    do = _load_rows(do_ptr, offs_m, stride_dot, h * stride_doh, offs_d, T, D, UPCAST)
    q_in, q_lo, q_hi = _query_intervals(enter_ptr, offs_m, T)
    lse = tl.load(lse_ptr + h * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(delta_ptr + h * T + offs_m, mask=offs_m < T, other=0.0)

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(0, tl.minimum((tile + 1) * BLOCK_M, T), BLOCK_N):
        t_in = tl.load(tile_in_ptr + n0 // BLOCK_N)
        t_out = tl.load(tile_out_ptr + n0 // BLOCK_N)
        if (t_in <= q_hi) & (t_out >= q_lo):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_ptr, offs_n, stride_kt, kvh * stride_kh, offs_d, T, D, UPCAST)
            v = _load_rows(v_ptr, offs_n, stride_vt, kvh * stride_vh, offs_d, T, D, UPCAST)
            k_in, k_out = _key_intervals(enter_ptr, exit_ptr, offs_n, T)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(_visible(offs_m, offs_n, q_in, k_in, k_out, T), tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    _store_rows(dq_ptr, dq * scale, offs_m, stride_dqt, h * stride_dqh, offs_d, T, D)


# ----------------------------------------------------------------------------------------------------------------
# Host side: checks, tile summaries, launchers, autograd, reference, functional API.
# ----------------------------------------------------------------------------------------------------------------
def _check(q, k, v, enter, exit) -> int:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"tree attention needs q [T, Hq, D], k and v [T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in tokens or head_dim")
    if hq % k.shape[1]:
        raise ValueError(f"num_heads {hq} is not a multiple of num_kv_heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device; got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported")
    for name, a in (("enter", enter), ("exit", exit)):
        if a.shape != (t,) or a.dtype not in (torch.int32, torch.int64) or a.device != q.device:
            raise ValueError(f"{name} must be an int32/int64 [{t}] tensor on {q.device}; got "
                             f"{tuple(a.shape)} {a.dtype} on {a.device}")
    return hq // k.shape[1]


def _tile_summary(enter, exit, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of `block` tokens: (min enter, max exit) as int32 — O(T / block), the only index work per call."""
    t = enter.shape[0]
    pad = (-t) % block
    lo = torch.nn.functional.pad(enter, (0, pad), value=_INT_MAX).view(-1, block).amin(1)
    hi = torch.nn.functional.pad(exit, (0, pad), value=-1).view(-1, block).amax(1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def _config(q: torch.Tensor, block_m: int | None, block_n: int | None) -> dict:
    interp = interpreting() and not q.is_cuda
    d_pad = max(16, triton.next_power_of_2(q.shape[-1]))
    bm = block_m or (16 if interp else LAUNCH["block_m"])
    bn = block_n or (16 if interp else LAUNCH["block_n"])
    exact = q.dtype == torch.float32 or interp
    launch = {} if interp else {"num_warps": LAUNCH["num_warps"], "num_stages": LAUNCH["num_stages"]}
    return {"D": q.shape[-1], "D_PAD": d_pad, "BLOCK_M": bm, "BLOCK_N": bn, "UPCAST": interp,
            "PRECISION": "ieee" if exact else "tf32", **launch}


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward_triton(q, k, v, enter, exit, scale, block_m=None, block_n=None):
    group = _check(q, k, v, enter, exit)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    enter, exit = enter.to(torch.int32).contiguous(), exit.to(torch.int32).contiguous()
    t, hq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, t), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    cfg = _config(q, block_m, block_n)
    tile_in, tile_out = _tile_summary(enter, exit, cfg["BLOCK_N"])
    _tree_attn_fwd_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), hq)](
        q, k, v, enter, exit, tile_in, tile_out, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        t, scale * LOG2E, GROUP=group, **cfg,
    )
    return out, lse


def _backward_triton(do, q, k, v, out, lse, enter, exit, scale, block_m=None, block_n=None):
    group = _check(q, k, v, enter, exit)
    do = _unit_stride(do)
    t, hq, _ = q.shape
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))  # contiguous
    if t == 0:
        return dq, dk, dv
    delta = torch.einsum("thd,thd->ht", out.float(), do.float()).contiguous()  # Δ = rowsum(O ⊙ dO)
    cfg = _config(q, block_m, block_n)
    q_in, q_hi = _tile_summary(enter, enter, cfg["BLOCK_M"])  # (min, max) enter per query tile
    k_in, k_out = _tile_summary(enter, exit, cfg["BLOCK_N"])
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
               do.stride(1))
    _tree_attn_dkdv_kernel[(triton.cdiv(t, cfg["BLOCK_N"]), k.shape[1])](
        q, k, v, do, lse, delta, enter, exit, q_in, q_hi, dk, dv, *strides, dk.stride(0), dk.stride(1),
        t, scale * LOG2E, scale, GROUP=group, **cfg,
    )
    _tree_attn_dq_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), hq)](
        q, k, v, do, lse, delta, enter, exit, k_in, k_out, dq, *strides, dq.stride(0), dq.stride(1),
        t, scale * LOG2E, scale, GROUP=group, **cfg,
    )
    return dq, dk, dv


class _TreeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, enter, exit, scale, block_m, block_n):
        enter, exit = enter.to(torch.int32).contiguous(), exit.to(torch.int32).contiguous()
        out, lse = _forward_triton(q, k, v, enter, exit, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, enter, exit)
        ctx.args = (scale, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, enter, exit = ctx.saved_tensors
        scale, block_m, block_n = ctx.args
        dq, dk, dv = _backward_triton(do, q, k, v, out, lse, enter, exit, scale, block_m, block_n)
        return dq, dk, dv, None, None, None, None, None


def tree_mask(enter: torch.Tensor, exit: torch.Tensor) -> torch.Tensor:
    """bool [T, T], True where key j is visible to query i (the module docstring's definition). Tests only."""
    idx = torch.arange(enter.shape[0], device=enter.device)
    return ((idx[None, :] <= idx[:, None]) & (enter[None, :] <= enter[:, None])
            & (enter[:, None] <= exit[None, :]))


def tree_attention_reference(q, k, v, enter, exit, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch: the dense mask from the interval arrays, fp32 softmax, autograd for the backward."""
    group = _check(q, k, v, enter, exit)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), kf) * scale
    p = torch.softmax(s.masked_fill(~tree_mask(enter, exit)[None], float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", p, vf).to(q.dtype)


def tree_attention(q, k, v, enter, exit, scale: float | None = None, *, block_m: int | None = None,
                   block_n: int | None = None) -> torch.Tensor:
    """Tree attention of packed tokens `q [T, Hq, D]`, `k, v [T, Hkv, D]` under `enter, exit [T]`; `[T, Hq, D]`.

    Differentiable in q, k, v. `block_m` / `block_n` override the tile sizes (tests put node boundaries on them).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if use_triton(q):
        return _TreeAttention.apply(q, k, v, enter, exit, scale, block_m, block_n)
    return tree_attention_reference(q, k, v, enter, exit, scale)
