"""Attention over the paged KV cache: decode (one query per sequence) and prefill/extend (packed query chunks).

Why: a fork in the rollout tree shares its parent's cache blocks, so a sequence's K/V are scattered over the pool
and reachable only through its block table. These kernels read K/V through the table directly: no gather into a
contiguous copy, which is what makes block sharing free at attention time.

Layout (see kv_cache.py): `k_cache`, `v_cache` `[num_blocks, block_size, num_kv_heads, head_dim]` contiguous;
`block_tables` `[B, max_blocks]` int32 (entries past a sequence's length are never read); `context_lens` `[B]`
int32 (>= 1). GQA: query head h uses KV head h // (Hq // Hkv).

- `paged_decode_attention(q [B, Hq, D], ...)`: one program per (sequence, KV head, context split). The queries of
  one KV head form a `[GROUP_PAD, D]` tile (padded to 16 rows for `tl.dot`), so each K/V tile is read once for the
  whole group. fp32 online softmax. When B * Hkv programs cannot fill the GPU, the context is split
  (flash-decoding) and a second kernel merges the splits through their log-sum-exps.
- `paged_prefill_attention(q [T, Hq, D], ..., cu_seqlens_q, context_lens)`: the queries of sequence b are the last
  `q_len_b` tokens of its context (already stored in the cache); causal. One program per (query tile, sequence,
  KV head); a tile's rows are (token, group member) pairs. Serves chunked prefill and `extend` alike.

Inference only (no autograd). The `*_reference` functions are the plain-PyTorch definitions (fp32 math) the tests
compare with. The CPU path (paged_attention_cpu.py) cuts the tables into shared and own runs of blocks, gathers each
run once, SDPA over padded batches of runs, merged per query row; `plan_torch` plans it once for all layers.
Triton's interpreter cannot compute in bfloat16, so under TRITON_INTERPRET=1 tiles are upcast to fp32 before
`tl.dot` (the GPU keeps bf16/fp16 tensor-core dots with fp32 accumulation).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from arpo_kernels._backend import interpreting, use_triton
from arpo_kernels.kv_cache import check_cache, check_index, gather_kv
from arpo_kernels.paged_attention_cpu import TorchPlan, _decode_torch, _prefill_torch

LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 128  # a context split never covers fewer tokens than this
_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 4  # split until B * Hkv * splits reaches this many programs per SM
# Launch knobs of the decode kernel on CUDA (benchmarks/tune_paged_decode.py sweeps them).
# Tuned on an H100 (bf16, D 128, block 16; do_bench): 2.41 TB/s at batch 64 x 4k context (72% of peak), 42 us at
# 16 x 4k, 48 us at 64 x 1k. Fewer, longer splits beat 16 programs per SM at 4k (2.19 TB/s) and cost 8% at 64 x 1k
# (44 us there), where the eager call's host time dominates anyway.
DECODE_LAUNCH = {"block_n": 32, "num_warps": 4, "num_stages": 3}


@triton.jit
def _kv_rows(bt_row_ptr, pos, mask, kv_head, BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """int64 offsets of the cache rows holding token positions `pos` of one sequence, for one KV head."""
    block = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return ((block * BLOCK_SIZE + pos % BLOCK_SIZE) * HKV + kv_head) * D


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, rows, n_mask, offs_d, d_mask, allowed, m_i, l_i, acc, qk_scale,
                 EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a K/V tile; `allowed` [M, N] masks scores (exp2 domain, scale folded in)."""
    if EVEN_D:  # keeps the row loads unmasked along D, hence vectorised
        kv_mask = n_mask[:, None]
    else:
        kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_bt, stride_ob, stride_oh, qk_scale, split_tokens, num_splits,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    start = split * split_tokens
    # The last split runs to the end, so a host-side length bound that is too small costs balance, not tokens.
    end = tl.where(split == num_splits - 1, ctx, tl.minimum(start + split_tokens, ctx))

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        rows = _kv_rows(bt_row, pos, n_mask, kv_head, BLOCK_SIZE, HKV, D)
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, rows, n_mask, offs_d, d_mask, n_mask[None, :],
                                     m_i, l_i, acc, qk_scale, D == D_PAD, UPCAST, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (start >= ctx) leaves l = 0, acc = 0
    out = acc / l_safe[:, None]
    if SPLIT:
        part = (b * HQ + heads) * num_splits + split
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=g_mask)
        tl.store(part_out_ptr + part[:, None] * D_PAD + offs_d[None, :], out, mask=g_mask[:, None])
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _split_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                         HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    part = (b * HQ + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))  # empty splits hold -inf: weight 0
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(part_out_ptr + part[:, None] * D_PAD + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, lens_ptr, out_ptr,
    stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, qk_scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TOK_M: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_ptr + b).to(tl.int64)
    q_len = tl.load(cu_ptr + b + 1).to(tl.int64) - q_start
    if tile * TOK_M >= q_len:
        return
    ctx = tl.load(lens_ptr + b).to(tl.int64)

    # Row r of the tile is query token tile*TOK_M + r // GROUP_PAD, head kv_head*GROUP + r % GROUP_PAD.
    offs_m = tl.arange(0, TOK_M * GROUP_PAD)
    tok = tile * TOK_M + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    q_pos = tl.where(row_ok, ctx - q_len + tok, 0)  # padding rows attend position 0 only: no empty rows
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < D
    heads = kv_head * GROUP + g
    q_rows = (q_start + tok) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([TOK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([TOK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([TOK_M * GROUP_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    kv_end = ctx - q_len + tl.minimum(q_len, (tile + 1) * TOK_M)  # last query of the tile sees up to here
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < kv_end
        rows = _kv_rows(bt_row, pos, n_mask, kv_head, BLOCK_SIZE, HKV, D)
        allowed = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, rows, n_mask, offs_d, d_mask, allowed,
                                     m_i, l_i, acc, qk_scale, D == D_PAD, UPCAST, PRECISION)

    out = acc / l_i[:, None]
    o_rows = (q_start + tok) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host side: checks, launch configuration, references, functional API.
# ----------------------------------------------------------------------------------------------------------------
def _check(q, k_cache, v_cache, block_tables, context_lens) -> tuple[int, int]:
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)}/{k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)}/{v_cache.dtype} must match")
    hkv, d = k_cache.shape[2:]
    if q.dim() != 3 or q.shape[2] != d:
        raise ValueError(f"q must be [N, num_heads, {d}] (head_dim of the cache), got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {k_cache.device}")
    if q.shape[1] % hkv:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {hkv}")
    check_index("block_tables", block_tables, 2, q.device)
    check_index("context_lens", context_lens, 1, q.device)
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {context_lens.shape[0]} sequences")
    return hkv, q.shape[1] // hkv


def _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens) -> tuple[int, int]:
    hkv_group = _check(q, k_cache, v_cache, block_tables, context_lens)
    check_index("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    if cu_seqlens_q.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries for {context_lens.shape[0]} sequences")
    return hkv_group


def check_paged_batch(kv_caches, slot_mapping, block_tables, context_lens, cu_seqlens_q, dtype: torch.dtype,
                      num_kv_heads: int, head_dim: int) -> None:
    """Everything the per-layer store/attention checks would find, checked once for a whole forward: every
    layer's caches (shape, dtype, contiguity), the slot mapping (in range), block tables, lengths, chunk bounds."""
    from arpo_kernels.kv_cache import _check_store

    rows = slot_mapping.shape[0]
    probe = torch.empty(rows, num_kv_heads, head_dim, dtype=dtype, device=slot_mapping.device)
    first = kv_caches[0][0]
    for layer, pair in enumerate(kv_caches):
        for name, cache in zip(("k_cache", "v_cache"), pair):
            check_cache(f"layer {layer} {name}", cache)
            if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
                raise ValueError(f"layer {layer} {name} is {tuple(cache.shape)}/{cache.dtype}/{cache.device}, "
                                 f"layer 0's k_cache {tuple(first.shape)}/{first.dtype}/{first.device}")
    _check_store(probe, probe, first, kv_caches[0][1], slot_mapping)  # slots in range (a free check on the CPU)
    if cu_seqlens_q is None:
        _check(probe, first, kv_caches[0][1], block_tables, context_lens)
    else:
        _check_prefill(probe, first, kv_caches[0][1], block_tables, cu_seqlens_q, context_lens)
        if first.device.type == "cpu":
            _check_chunks_fit(cu_seqlens_q, context_lens)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tile_config(q: torch.Tensor, d: int) -> tuple[int, bool, str]:
    """(BLOCK_N, UPCAST, input precision): K/V tiles of about 16 KiB; exact fp32 dots; fp32 in the interpreter."""
    interp = interpreting() and not q.is_cuda
    d_pad = max(16, triton.next_power_of_2(d))
    block_n = 16 if interp else max(16, min(64, 16384 // (q.element_size() * d_pad)))
    exact = q.dtype == torch.float32 or interp
    return block_n, interp, "ieee" if exact else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_splits(programs: int, max_ctx: int, device: torch.device) -> int:
    """Flash-decoding heuristic: split the context only while B * Hkv programs leave SMs idle."""
    target = _PROGRAMS_PER_SM * _sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), max_ctx // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


def _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, max_context_len):
    hkv, group = _check(q, k_cache, v_cache, block_tables, context_lens)
    q, block_tables, context_lens = _unit_stride(q), _unit_stride(block_tables), _unit_stride(context_lens)
    bsz, hq, d = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if bsz == 0:
        return out
    block_n, upcast, precision = _tile_config(q, d)
    if q.is_cuda and DECODE_LAUNCH["block_n"]:
        block_n = DECODE_LAUNCH["block_n"]
    launch = {"num_warps": DECODE_LAUNCH["num_warps"] if q.is_cuda else 4}
    if q.is_cuda and DECODE_LAUNCH["num_stages"]:
        launch["num_stages"] = DECODE_LAUNCH["num_stages"]
    max_ctx = max_context_len or block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_splits(bsz * hkv, max_ctx, q.device)
    split_tokens = triton.cdiv(triton.cdiv(max_ctx, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_ctx, split_tokens)
    d_pad = max(16, triton.next_power_of_2(d))
    split = num_splits > 1
    part_out = torch.empty((bsz, hq, num_splits, d_pad) if split else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((bsz, hq, num_splits) if split else (1,), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, split_tokens, num_splits,
        HQ=hq, HKV=hkv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split, UPCAST=upcast, PRECISION=precision, **launch,
    )
    if split:
        _split_reduce_kernel[(bsz, hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            HQ=hq, D=d, D_PAD=d_pad, S_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


def _prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len):
    hkv, group = _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    q, block_tables = _unit_stride(q), _unit_stride(block_tables)
    cu_seqlens_q, context_lens = _unit_stride(cu_seqlens_q), _unit_stride(context_lens)
    total, hq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    bsz = context_lens.shape[0]
    if total == 0 or bsz == 0:
        return out
    if max_q_len is None:  # one host sync; the engine knows this number and should pass it
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_n, upcast, precision = _tile_config(q, d)
    group_pad = triton.next_power_of_2(group)
    rows = 16 if upcast else 64  # query rows (token, group member) per program
    tok_m = max(1, rows // group_pad)
    _paged_prefill_kernel[(triton.cdiv(max_q_len, tok_m), bsz, hkv)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), scale * LOG2E,
        HKV=hkv, GROUP=group, GROUP_PAD=group_pad, TOK_M=tok_m, D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, UPCAST=upcast, PRECISION=precision, num_warps=4,
    )
    return out


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """Plain PyTorch, batched without host syncs: gather every table entry, mask positions >= context_len."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    bsz, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    valid = pos[None, :] < context_lens[:, None].long()  # [B, L]
    blocks = block_tables.long()[:, pos // block_size]
    slots = torch.where(valid, blocks, 0) * block_size + pos % block_size  # unused entries may be garbage
    k = k_cache.view(-1, hkv, d)[slots].float()  # [B, L, Hkv, D]
    v = v_cache.view(-1, hkv, d)[slots].float()
    qg = q.float().view(bsz, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    p = torch.softmax(s.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v).reshape(bsz, hq, d).to(q.dtype)


def paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None):
    """Plain PyTorch, one sequence at a time: gather its context, causal attention for its last q_len positions."""
    _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    hq, d = q.shape[1:]
    group = hq // k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, ctx in enumerate(lens):
        lo, hi = cu[b], cu[b + 1]
        if hi - lo > ctx:
            raise ValueError(f"sequence {b} has {hi - lo} queries but a context of only {ctx}")
        k = gather_kv(k_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        causal = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None, *, num_splits=None,
                           max_context_len=None, plan: TorchPlan | None = None) -> torch.Tensor:
    """Attention of one query per sequence `q [B, Hq, D]` over its paged context; returns `[B, Hq, D]`.

    `num_splits` forces the context-split count (default: heuristic); `max_context_len`, a host-side bound on
    context_lens, sharpens the heuristic when block_tables is wider than the batch needs. `plan` (from
    `plan_torch`, PyTorch path only) reuses one batch's index work across layers.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if use_triton(q):
        return _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, max_context_len)
    if plan is None:
        _check(q, k_cache, v_cache, block_tables, context_lens)
    return _decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, plan)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None, *,
                            max_q_len=None, plan: TorchPlan | None = None) -> torch.Tensor:
    """Causal attention of packed query chunks `q [T, Hq, D]` (the last tokens of each context); `[T, Hq, D]`.

    `max_q_len` (host int) avoids the one device sync needed to size the launch grid. `plan`: as for decode.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if use_triton(q):
        return _prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len)
    if plan is None:
        _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
        _check_chunks_fit(cu_seqlens_q, context_lens)
    return _prefill_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, plan)


def _check_chunks_fit(cu_seqlens_q, context_lens) -> None:
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    bad = (q_lens > context_lens.long()).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(f"sequence {b} has {int(q_lens[b])} queries but a context of only {int(context_lens[b])}")
