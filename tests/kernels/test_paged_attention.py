"""Paged decode and prefill attention vs SDPA on the contiguous K/V and vs the references, on both backends.

The oracle never goes through a block table: each sequence's K/V is drawn contiguous, scattered by the test into
a shuffled block pool, and SDPA runs on the original contiguous tensors.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from arpo_kernels._backend import backend_for
from arpo_kernels.paged_attention import (
    _num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)

HKV = 2
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# (block_size, GQA ratio, head_dim): every value of each axis appears, not every combination.
CASES = [(1, 1, 64), (16, 2, 80), (32, 7, 128), (16, 7, 64), (32, 1, 80), (1, 2, 128)]
DTYPES = [torch.float32, torch.bfloat16]


def _lens(block_size):
    """Length 1, exactly one block, one past a block boundary, and a ragged multi-tile one."""
    return [1, block_size, block_size + 1, max(2 * block_size + 3, 37)]


def _paged(lens, block_size, d, dtype, device):
    """Random contiguous K/V per sequence, written into a shuffled pool; unused table entries are garbage."""
    nblocks = [math.ceil(n / block_size) for n in lens]
    pool = sum(nblocks) + 2
    k_cache = torch.randn(pool, block_size, HKV, d, device=device).to(dtype)  # noise where nothing is stored
    v_cache = torch.randn(pool, block_size, HKV, d, device=device).to(dtype)
    tables = torch.randint(pool, 2**30, (len(lens), max(nblocks) + 1), dtype=torch.int32, device=device)
    perm = torch.randperm(pool, device=device)
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        ids = perm[used:used + nblocks[b]]
        used += nblocks[b]
        tables[b, :len(ids)] = ids.int()
        pos = torch.arange(n, device=device)
        slots = ids[pos // block_size] * block_size + pos % block_size
        ks.append(torch.randn(n, HKV, d, device=device).to(dtype))
        vs.append(torch.randn(n, HKV, d, device=device).to(dtype))
        k_cache.view(-1, HKV, d)[slots] = ks[-1]
        v_cache.view(-1, HKV, d)[slots] = vs[-1]
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens_t, ks, vs


def _sdpa(q, k, v):
    """q [n, Hq, D] are the last n positions of a context k, v [L, Hkv, D]; fp32, causal, GQA."""
    n, length = q.shape[0], k.shape[0]
    q_pos = torch.arange(length - n, length, device=q.device)
    allowed = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                         v.float().transpose(0, 1)[None], attn_mask=allowed, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,group,d", CASES)
def test_decode_matches_sdpa(backend, device, dtype, block_size, group, d):
    lens = _lens(block_size)
    k_cache, v_cache, tables, lens_t, ks, vs = _paged(lens, block_size, d, dtype, device)
    q_all = torch.randn(len(lens), HKV * group + 3, d, device=device).to(dtype)
    q = q_all[:, 3:]  # a strided view, as when q comes out of a fused projection
    assert backend_for(q) == backend
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t)
    assert out.shape == q.shape and out.dtype == dtype
    for b in range(len(lens)):
        torch.testing.assert_close(out[b].float(), _sdpa(q[b:b + 1], ks[b], vs[b])[0], **TOL[dtype])
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens_t)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_decode_split_kv(monkeypatch, device, num_splits):
    """Forced context splits, including splits that start past a short sequence's end, match one pass."""
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "triton")
    lens = [1, 40, 67, 17]
    k_cache, v_cache, tables, lens_t, ks, vs = _paged(lens, 16, 80, torch.float32, device)
    q = torch.randn(len(lens), HKV * 7, 80, device=device)
    strided = torch.stack([tables, tables * 0], -1)[..., 0]  # index tensors need not be contiguous
    assert strided.stride(1) == 2
    out = paged_decode_attention(q, k_cache, v_cache, strided, lens_t, scale=0.3, num_splits=num_splits)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens_t, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for bound in (67, 20):  # exact, and too small: the last split must still run to each context's end
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, scale=0.3, num_splits=num_splits,
                                     max_context_len=bound)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_split_heuristic():
    import arpo_kernels.paged_attention as pa

    cpu = torch.device("cpu")  # counts as one SM: the target is _PROGRAMS_PER_SM programs
    target = pa._PROGRAMS_PER_SM
    assert _num_splits(programs=2 * target, max_ctx=1 << 16, device=cpu) == 1  # enough programs already
    assert _num_splits(programs=1, max_ctx=1 << 16, device=cpu) == target
    assert _num_splits(programs=1, max_ctx=200, device=cpu) == 1  # too short to split


def _packed(seqs, group, d, dtype, device):
    """Queries for (context_len, q_len) pairs, packed, with cu_seqlens."""
    q_lens = [n for _, n in seqs]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), HKV * group, d, device=device).to(dtype)
    return q, cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,group,d", CASES)
def test_prefill_matches_sdpa(backend, device, dtype, block_size, group, d):
    # q_len == context_len (fresh prefill) and q_len < context_len (a chunk or an `extend` after a tool result)
    seqs = [(1, 1), (block_size + 1, block_size + 1), (37, 5), (2 * block_size + 3, 1), (20, 20)]
    k_cache, v_cache, tables, lens_t, ks, vs = _paged([c for c, _ in seqs], block_size, d, dtype, device)
    q, cu = _packed(seqs, group, d, dtype, device)
    assert backend_for(q) == backend
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens_t)
    assert out.shape == q.shape and out.dtype == dtype
    for b in range(len(seqs)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        torch.testing.assert_close(out[lo:hi].float(), _sdpa(q[lo:hi], ks[b], vs[b]), **TOL[dtype])
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens_t)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_prefill_of_one_token_is_decode(backend, device):
    lens = [1, 16, 33]
    k_cache, v_cache, tables, lens_t, _, _ = _paged(lens, 16, 64, torch.float32, device)
    q = torch.randn(len(lens), HKV * 2, 64, device=device)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    pre = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens_t, max_q_len=1)
    dec = paged_decode_attention(q, k_cache, v_cache, tables, lens_t)
    torch.testing.assert_close(pre, dec, **TOL[torch.float32])


def test_chunked_prefill_equals_whole(backend, device):
    """Prefilling 30 tokens as chunks 12 + 18 gives the same outputs as one chunk of 30."""
    k_cache, v_cache, tables, lens_t, _, _ = _paged([30], 16, 64, torch.float32, device)
    q = torch.randn(30, HKV * 7, 64, device=device)
    whole = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 30], dtype=torch.int32,
                                                                                device=device), lens_t)
    first = paged_prefill_attention(q[:12], k_cache, v_cache, tables, torch.tensor([0, 12], dtype=torch.int32,
                                                                                  device=device), lens_t - 18)
    second = paged_prefill_attention(q[12:], k_cache, v_cache, tables, torch.tensor([0, 18], dtype=torch.int32,
                                                                                  device=device), lens_t)
    torch.testing.assert_close(torch.cat([first, second]), whole, **TOL[torch.float32])


def test_errors(device):
    k_cache, v_cache, tables, lens_t, _, _ = _paged([5, 9], 4, 64, torch.float32, device)
    q = torch.randn(2, 4, 64, device=device)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(torch.randn(2, 3, 64, device=device), k_cache, v_cache, tables, lens_t)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(2, 4, 80, device=device), k_cache, v_cache, tables, lens_t)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.bfloat16(), k_cache, v_cache, tables, lens_t)
    with pytest.raises(ValueError, match="block_tables must be int32 or int64"):
        paged_decode_attention(q, k_cache, v_cache, tables.float(), lens_t)
    with pytest.raises(ValueError, match="rows for 1 sequences"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens_t[:1])
    with pytest.raises(ValueError, match="contiguous"):
        paged_decode_attention(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), tables, lens_t)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 entries"):
        paged_prefill_attention(q, k_cache, v_cache, tables, cu[:2], lens_t, max_q_len=1)
    with pytest.raises(ValueError, match="context of only 5"):
        paged_prefill_attention_reference(torch.randn(8, 4, 64, device=device), k_cache, v_cache, tables,
                                          torch.tensor([0, 6, 8], dtype=torch.int32, device=device), lens_t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at production tile sizes need CUDA")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_gpu_long_contexts(monkeypatch, num_splits):
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "triton")
    lens = [1, 700, 1500, 2048]
    k_cache, v_cache, tables, lens_t, ks, vs = _paged(lens, 16, 128, torch.bfloat16, "cuda")
    q = torch.randn(len(lens), 16, 128, device="cuda", dtype=torch.bfloat16)[:, :HKV * 8]
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, num_splits=num_splits)
    for b in range(len(lens)):
        torch.testing.assert_close(out[b].float(), _sdpa(q[b:b + 1], ks[b], vs[b])[0], **TOL[torch.bfloat16])
