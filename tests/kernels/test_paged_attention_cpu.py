"""The CPU path's shared-prefix (cascade) decode: sequences whose tables share leading blocks, as forked children do,
must get exactly the attention of their whole contexts (vs the plain-PyTorch reference)."""
import pytest
import torch

from arpo_kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)
import arpo_kernels.paged_attention_cpu as cpu_path
from arpo_kernels.paged_attention_cpu import MIN_SHARED_BLOCKS, _shared_groups, plan_torch

BS, HKV, D = 4, 2, 16
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def always_cascade(monkeypatch):
    """Take the cascade path whenever a group shares enough blocks, however little that saves (small tests)."""
    monkeypatch.setattr(cpu_path, "CASCADE_MAX_GATHER", float("inf"))


def _forest(shared_blocks: list[int], members: list[int], extra: list[list[int]], singles: list[int]):
    """Block tables of groups of sequences: group g has `shared_blocks[g]` common blocks, then each member its own
    tail of extra[g][j] tokens (a partial shared last block is possible: a tail of 0 ends inside the prefix);
    `singles` are unrelated sequences of those lengths. Returns tables (garbage-padded), lengths."""
    next_block = [0]

    def fresh(n):
        ids = list(range(next_block[0], next_block[0] + n))
        next_block[0] += n
        return ids

    tables, lens = [], []
    for g, n_shared in enumerate(shared_blocks):
        prefix = fresh(n_shared)
        for j in range(members[g]):
            tail = extra[g][j]
            length = n_shared * BS + tail  # tail < 0: ends inside the prefix
            own = fresh(-(-max(tail, 0) // BS))
            tables.append(prefix + own)
            lens.append(length)
    for n in singles:
        tables.append(fresh(-(-n // BS)))
        lens.append(n)
    width = max(len(t) for t in tables) + 1
    pool = next_block[0] + 3
    padded = [t + [pool + 7 + i for i in range(width - len(t))] for t in tables]  # garbage past the end
    return torch.tensor(padded, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_cascade_decode_matches_reference(always_cascade, dtype, group):
    torch.manual_seed(0)
    # group 0: 3 children of a 5-block prefix with tails 3, 0 (ends exactly at the prefix), 9;
    # group 1: 2 children of a 2-block prefix, one ending inside it (-2 tokens); plus 2 unrelated sequences
    tables, lens, pool = _forest([5, 2], [3, 2], [[3, 0, 9], [6, -2]], [7, 13])
    k_cache = torch.randn(pool, BS, HKV, D).to(dtype)
    v_cache = torch.randn(pool, BS, HKV, D).to(dtype)
    q = torch.randn(len(lens), HKV * group, D).to(dtype)
    plan = plan_torch(k_cache, tables, lens)
    assert plan.decode["kind"] == "cascade"
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, plan=plan)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    assert torch.equal(paged_decode_attention(q, k_cache, v_cache, tables, lens), out)  # planned internally too


def test_groups_need_enough_shared_blocks():
    tables = [[0, 1, 2, 9], [0, 1, 2, 8], [0, 1, 5], [3, 4], [3, 6], [7]]
    lens = [15, 14, 10, 8, 8, 3]
    groups = _shared_groups(tables, lens, BS)
    # the first three share blocks 0, 1 (and 2 only for two of them): one group, 2 blocks = 8 tokens
    assert groups == [([0, 1, 2], MIN_SHARED_BLOCKS * BS)]
    # sequences 3 and 4 share one block only: below MIN_SHARED_BLOCKS, attended plainly


def test_shared_prefix_capped_by_the_shortest_member():
    tables = [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert _shared_groups(tables, [14, 11], BS) == [([0, 1], 11)]


def test_mixed_step_with_cascade_decodes_and_chunks(always_cascade):
    torch.manual_seed(1)
    tables, lens, pool = _forest([4], [3], [[2, 5, 1]], [9])
    k_cache, v_cache = torch.randn(pool, BS, HKV, D), torch.randn(pool, BS, HKV, D)
    q_lens = [1, 1, 4, 6]  # two decodes sharing the prefix, a chunk of a sharing sequence, an unrelated prefill
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), HKV * 2, D)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens)
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_cascade_right_after_a_fork(always_cascade):
    """Children just forked: each context is exactly the shared prefix (no tails at all)."""
    torch.manual_seed(2)
    tables, lens, pool = _forest([3, 2], [2, 3], [[0, 0], [0, 0, 0]], [])
    k_cache, v_cache = torch.randn(pool, BS, HKV, D), torch.randn(pool, BS, HKV, D)
    q = torch.randn(len(lens), HKV * 3, D)
    plan = plan_torch(k_cache, tables, lens)
    assert plan.decode["kind"] == "cascade" and plan.decode["t_width"] == 0
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, plan=plan)
    torch.testing.assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens),
                               **TOL[torch.float32])


def test_cascade_only_when_it_saves_enough():
    """16 children of a 32-block prompt with short tails take the cascade; two sequences sharing 2 of 30 blocks
    do not (the plain path gathers little more than the cascade would)."""
    tables, lens, pool = _forest([32], [16], [[5] * 16], [])
    k_cache = torch.zeros(pool, BS, HKV, D)
    assert plan_torch(k_cache, tables, lens).decode["kind"] == "cascade"
    tables, lens, pool = _forest([2], [2], [[110, 112]], [])
    assert plan_torch(torch.zeros(pool, BS, HKV, D), tables, lens).decode["kind"] == "plain"
