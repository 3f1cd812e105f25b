"""The CPU path's shared-block attention: tables cut into parts (a trie over block ids), parts batched by size,
partial results merged per query row. Whatever the sharing, decodes and chunks must get exactly the attention of
their whole contexts (vs the plain-PyTorch references)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpo_kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)
from arpo_kernels.paged_attention_cpu import _buckets, plan_torch, split_shared

BS, HKV, D = 4, 2, 16
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _tree_tables(spec: list[tuple[int, int, int]]):
    """Tables grown like a rollout tree. spec[i] = (parent, shared blocks, own tokens): table i copies the first
    `shared` blocks of table `parent` (-1: none) and adds fresh blocks for `own` more tokens; its length is
    shared * BS + own (own < 0: ends inside the shared blocks). Returns padded int32 tables (garbage past each
    length), int32 lengths and the pool size."""
    tables, lens, next_block = [], [], 0
    for parent, shared, own in spec:
        prefix = tables[parent][:shared] if parent >= 0 else []
        fresh = -(-max(own, 0) // BS)
        tables.append(prefix + list(range(next_block, next_block + fresh)))
        next_block += fresh
        lens.append(len(prefix) * BS + own)
    width = max(len(t) for t in tables) + 1
    pool = next_block + 2
    padded = [t + [2**20 + i for i in range(width - len(t))] for t in tables]
    return torch.tensor(padded, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), pool


# a prompt of 5 blocks with two samples; one sample forked twice after 7 blocks, one fork forked again;
# an unrelated sequence; a child forked right now (its context is all shared) and one ending inside a shared block
NESTED = [(-1, 0, 20), (0, 5, 9), (0, 5, 13), (1, 7, 6), (1, 7, 1), (3, 8, 3), (-1, 0, 11), (2, 8, 0), (2, 8, -2)]


def _caches(pool, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(pool, BS, HKV, D, generator=g).to(dtype), torch.randn(pool, BS, HKV, D, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_over_nested_sharing_matches_reference(dtype, group):
    tables, lens, pool = _tree_tables(NESTED)
    tables, lens = tables[1:], lens[1:]  # the prompt itself is not decoding
    k_cache, v_cache = _caches(pool, dtype)
    q = torch.randn(len(lens), HKV * group, D).to(dtype)
    plan = plan_torch(k_cache, tables, lens)
    assert plan.merge.shape[1] >= 3  # rows merge partial results from several levels of sharing
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, plan=plan)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    assert torch.equal(paged_decode_attention(q, k_cache, v_cache, tables, lens), out)  # planned internally too


def test_no_sharing_needs_no_merge():
    tables, lens, pool = _tree_tables([(-1, 0, 3), (-1, 0, 40), (-1, 0, 9), (-1, 0, 41)])
    k_cache, v_cache = _caches(pool, torch.float32)
    plan = plan_torch(k_cache, tables, lens)
    assert plan.merge.shape[1] == 1
    q = torch.randn(4, HKV * 2, D)
    torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, tables, lens, plan=plan),
                               paged_decode_attention_reference(q, k_cache, v_cache, tables, lens),
                               **TOL[torch.float32])


def test_mixed_step_with_shared_blocks():
    """Decodes and chunks in one step: two decodes on a shared prompt, an extend (tool result) of a third sample
    of it, an unrelated prefill, a one-token chunk."""
    tables, lens, pool = _tree_tables([(-1, 0, 18), (0, 4, 5), (0, 4, 9), (0, 4, 2), (-1, 0, 10), (-1, 0, 7)])
    tables, lens = tables[1:], lens[1:]
    k_cache, v_cache = _caches(pool, torch.float32, seed=1)
    q_lens = [1, 6, 1, 10, 1]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), HKV * 2, D)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_chunk_reaching_into_shared_blocks():
    """A chunk whose first queries lie inside blocks it shares (a tree-packed re-run): rows see only the keys
    before them, part by part; rows before a part start skip it."""
    tables, lens, pool = _tree_tables([(-1, 0, 16), (0, 3, 6), (0, 3, 2)])
    tables, lens = tables[1:], lens[1:]
    k_cache, v_cache = _caches(pool, torch.float32, seed=2)
    # sequence 0 (length 14) has 13 queries: they start at position 1, inside the blocks it shares
    cu = torch.tensor([0, 13, 15], dtype=torch.int32)
    q = torch.randn(15, HKV, D)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    torch.testing.assert_close(out, paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens),
                               **TOL[torch.float32])


def test_split_shared_is_the_trie():
    tables = [[0, 1, 2, 9], [0, 1, 2, 8], [0, 1, 5], [3, 4], [3, 6], [7], [0, 1, 2]]
    parts = sorted((p.start, p.blocks, sorted(p.members)) for p in split_shared(tables))
    assert parts == [
        (0, [0, 1], [0, 1, 2, 6]),   # the common run of the first group
        (0, [3], [3, 4]),
        (0, [7], [5]),
        (1, [4], [3]), (1, [6], [4]),
        (2, [2], [0, 1, 6]),         # one level down: blocks 0, 1, 2 are shared by three
        (2, [5], [2]),
        (3, [8], [1]), (3, [9], [0]),
    ]


@st.composite
def _forests(draw):
    n = draw(st.integers(1, 7))
    spec = []
    for i in range(n):
        parent = draw(st.integers(-1, i - 1))
        if parent >= 0:
            parent_blocks = -(-max(spec[parent][1] * BS + spec[parent][2], 1) // BS)
            shared = draw(st.integers(0, parent_blocks))
        else:
            shared = 0
        own = draw(st.integers(1 if shared == 0 else -BS + 1, 3 * BS + 1))
        spec.append((parent, shared, own))
    return spec


@settings(max_examples=40, deadline=None)
@given(spec=_forests(), group=st.sampled_from([1, 3]), data=st.data())
def test_any_sharing_matches_reference(spec, group, data):
    tables, lens, pool = _tree_tables(spec)
    assert bool((lens > 0).all())
    k_cache, v_cache = _caches(pool, torch.float32, seed=len(spec))
    # every table covered exactly once by the parts
    host = [t[:-(-n // BS)] for t, n in zip(tables.tolist(), lens.tolist())]
    seen = sorted((m, p.start + j) for p in split_shared(host) for m in p.members for j in range(len(p.blocks)))
    assert seen == sorted((m, j) for m, t in enumerate(host) for j in range(len(t)))
    q_lens = [data.draw(st.integers(1, int(n))) for n in lens.tolist()]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), HKV * group, D)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    torch.testing.assert_close(out, paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens),
                               **TOL[torch.float32])
    qd = torch.randn(len(spec), HKV * group, D)
    torch.testing.assert_close(paged_decode_attention(qd, k_cache, v_cache, tables, lens),
                               paged_decode_attention_reference(qd, k_cache, v_cache, tables, lens),
                               **TOL[torch.float32])


def test_buckets_weigh_padding_against_calls():
    # equal parts share one batch; a 64-block part does not pad 30 one-block parts up to its width
    assert _buckets([(8, 1)] * 5) == [[0, 1, 2, 3, 4]]
    groups = _buckets([(64, 1)] + [(1, 1)] * 30)
    assert [0] in groups and sorted(i for g in groups for i in g) == list(range(31))
    # a part scored against 64 query rows does not pad the rows of one-row parts
    groups = _buckets([(32, 64)] + [(30, 1)] * 20)
    assert [0] in groups
    # one tiny part is cheaper to pad than to launch on its own
    assert len(_buckets([(10, 1), (9, 1)])) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_merge_with_rows_on_one_part(dtype):
    """One level of sharing (the fast two-way merge): children of one prompt, one of them just forked (all its
    context shared), next to an unrelated sequence whose row has a single part."""
    tables, lens, pool = _tree_tables([(-1, 0, 12), (0, 3, 5), (0, 3, 0), (-1, 0, 9)])
    tables, lens = tables[1:], lens[1:]
    k_cache, v_cache = _caches(pool, dtype, seed=3)
    plan = plan_torch(k_cache, tables, lens)
    assert plan.merge.shape[1] == 2
    q = torch.randn(3, HKV * 2, D).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, plan=plan)
    torch.testing.assert_close(out.float(), paged_decode_attention_reference(q, k_cache, v_cache, tables, lens).float(),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_math_lse_path_matches_reference(dtype, monkeypatch):
    """Off the CPU (the reference path run on CUDA) the partial attentions come from plain fp32 math instead of
    the CPU-only flash kernel; the same nested-sharing case, forced through it, must still be exact."""
    import arpo_kernels.paged_attention_cpu as cpu_path

    monkeypatch.setattr(cpu_path, "_sdpa_lse", cpu_path._sdpa_lse_math)
    tables, lens, pool = _tree_tables(NESTED)
    k_cache, v_cache = _caches(pool, dtype, seed=3)
    q = torch.randn(len(lens) - 1, HKV * 4, D).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables[1:], lens[1:])
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables[1:], lens[1:])
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)  # chunks of 3, 1 and 5 tokens on three of the contexts
    sel = [1, 4, 6]
    qp = torch.randn(9, HKV * 4, D).to(dtype)
    out = paged_prefill_attention(qp, k_cache, v_cache, tables[sel], cu, lens[sel])
    ref = paged_prefill_attention_reference(qp, k_cache, v_cache, tables[sel], cu, lens[sel])
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
