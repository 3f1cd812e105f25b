"""Behaviour of the KV block manager, run against each twin (Python always, C++ when `arpo._C` is built).

Beyond bookkeeping, these tests simulate the KV cache itself (`KVSim`): the caller writes each token id into
the slot the manager hands out and performs the reported block copies first; reading a sequence back through
its block table must give its tokens. That catches any write into a shared block or any false prefix hit.
"""
import os
import random
import subprocess
import sys

import pytest

from arpo.engine import block_manager_py
from arpo.engine.block_manager import BlockManagerCpp, BlockManagerPy, check_invariants
from arpo.engine.errors import (
    BlockManagerError,
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    UnknownSequenceError,
)

IMPLS = [pytest.param(BlockManagerPy, id="python"),
         pytest.param(BlockManagerCpp, id="cpp",
                      marks=pytest.mark.skipif(BlockManagerCpp is None, reason="arpo._C is not built"))]


@pytest.fixture(params=IMPLS)
def make(request):
    return request.param


class KVSim:
    """A fake KV cache holding token ids: blocks of `block_size` cells."""

    def __init__(self, bm):
        self.bm, self.bs = bm, bm.block_size
        self.cells = [[None] * self.bs for _ in range(bm.num_blocks)]
        self.expect: dict[int, list] = {}

    def allocate(self, sid, tokens):
        cached = self.bm.allocate(sid, tokens)
        table = self.bm.block_table(sid)
        assert cached % self.bs == 0 and 0 <= cached < max(len(tokens), 1)
        for p in range(cached, len(tokens)):  # the prefill writes the uncached tail
            b = table[p // self.bs]
            assert self.bm.ref_count(b) == 1, f"prefill would write shared block {b}"
            self.cells[b][p % self.bs] = tokens[p]
        self.expect[sid] = list(tokens)
        return cached

    def append(self, sid, tokens, give_ids=True):
        slots, copies = self.bm.append(sid, len(tokens), list(tokens) if give_ids else None)
        assert len(copies) <= 1
        for src, dst in copies:
            self.cells[dst] = list(self.cells[src])
        for slot, t in zip(slots, tokens):
            assert self.bm.ref_count(slot // self.bs) == 1, f"slot {slot} lies in a shared block"
            self.cells[slot // self.bs][slot % self.bs] = t
        self.expect[sid].extend(tokens)
        return slots, copies

    def fork(self, parent, child, at=None):
        copies = self.bm.fork(parent, child, at)
        assert copies == []
        self.expect[child] = self.expect[parent][: len(self.expect[parent]) if at is None else at]

    def free(self, sid):
        self.bm.free(sid)
        del self.expect[sid]

    def check(self):
        check_invariants(self.bm)
        for sid, tokens in self.expect.items():
            table = self.bm.block_table(sid)
            got = [self.cells[table[p // self.bs]][p % self.bs] for p in range(len(tokens))]
            assert got == tokens, f"sequence {sid} reads back wrong tokens"


def test_allocate_and_append_slots(make):
    bm = make(8, 4)
    assert bm.allocate(0, [1, 2, 3, 4, 5, 6]) == 0
    table = bm.block_table(0)
    assert len(table) == 2 and bm.num_tokens(0) == 6 and bm.num_free_blocks == 6
    slots, copies = bm.append(0, 3)
    assert copies == []
    t = bm.block_table(0)
    assert slots == [t[1] * 4 + 2, t[1] * 4 + 3, t[2] * 4 + 0] and bm.num_tokens(0) == 9
    assert bm.append(0, 0) == ([], [])
    assert bm.has(0) and bm.seq_ids() == [0]
    bm.free(0)
    assert bm.num_free_blocks == 8 and not bm.has(0) and bm.seq_ids() == []


def test_prefix_reuse_stores_samples_of_a_prompt_once(make):
    bs, n_samples = 4, 8
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks + 2 tokens
    bm = make(64, bs)
    sim = KVSim(bm)
    assert sim.allocate(0, prompt) == 0
    for s in range(1, n_samples):
        assert sim.allocate(s, prompt) == 16
    # 4 shared full blocks + one private partial block per sample
    assert bm.num_blocks - bm.num_free_blocks == 4 + n_samples
    shared = bm.block_table(0)[:4]
    assert all(bm.block_table(s)[:4] == shared for s in range(n_samples))
    assert all(bm.ref_count(b) == n_samples for b in shared)
    for s in range(n_samples):
        sim.append(s, [s])
    sim.check()
    no_cache = make(64, bs, enable_prefix_caching=False)
    for s in range(n_samples):
        assert no_cache.allocate(s, prompt) == 0
    assert no_cache.num_blocks - no_cache.num_free_blocks == 5 * n_samples


def test_last_prompt_block_is_never_a_hit(make):
    bm = make(16, 4)
    bm.allocate(0, list(range(8)))
    assert bm.allocate(1, list(range(8))) == 4  # block 1 holds the last token: recomputed
    assert bm.allocate(2, list(range(9))) == 8
    assert bm.allocate(3, list(range(4))) == 0 and bm.allocate(4, []) == 0


def test_freed_blocks_stay_cached_until_reused(make):
    bm = make(6, 2)
    sim = KVSim(bm)
    prompt = [7, 8, 9, 10, 11]
    sim.allocate(0, prompt)
    first = bm.block_table(0)
    sim.free(0)
    assert sim.allocate(1, prompt) == 4 and bm.block_table(1)[:2] == first[:2]
    sim.check()
    sim.free(1)
    sim.allocate(2, [1] * 12)  # takes every block: the cached prefix is evicted
    sim.free(2)
    assert sim.allocate(3, prompt) == 0
    sim.check()


def test_append_with_token_ids_registers_full_blocks(make):
    bm = make(16, 4)
    bm.allocate(0, [1, 2, 3])
    bm.append(0, 6, [4, 5, 6, 7, 8, 9])
    assert bm.allocate(1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == 8
    bm.append(1, 1)  # without ids the rest of sequence 1 is unknown: nothing more is registered
    bm.append(1, 4, [12, 13, 14, 15])
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]) == 8


def test_hash_collisions_are_caught_by_comparing_tokens(monkeypatch):
    monkeypatch.setattr(block_manager_py, "chain_hash", lambda prev, tokens: 42)
    bm = BlockManagerPy(16, 2)
    sim = KVSim(bm)
    sim.allocate(0, [1, 2, 3, 4, 5])
    assert sim.allocate(1, [1, 2, 9, 9, 5]) == 0
    sim.check()


def test_chain_hash_twins_agree():
    if BlockManagerCpp is None:
        pytest.skip("arpo._C is not built")
    from arpo import _C
    rng = random.Random(0)
    prev = _C.ROOT_HASH
    assert prev == block_manager_py.ROOT_HASH
    for _ in range(50):
        tokens = [rng.randrange(-2**63, 2**63) for _ in range(rng.randrange(0, 9))]
        h = _C.chain_hash(prev, tokens)
        assert h == block_manager_py.chain_hash(prev, tokens)
        prev = h
    assert block_manager_py.chain_hash(1, [1, 2]) != block_manager_py.chain_hash(1, [2, 1])


@pytest.mark.parametrize("at", [None, 0, 3, 4, 5, 8, 10])
def test_fork_shares_and_copies_at_most_one_partial_block(make, at):
    bm = make(32, 4)
    sim = KVSim(bm)
    sim.allocate(0, list(range(10)))  # blocks: full, full, 2 tokens
    free_before = bm.num_free_blocks
    sim.fork(0, 1, at)
    cut = 10 if at is None else at
    assert bm.num_free_blocks == free_before  # a fork allocates nothing
    assert bm.block_table(1) == bm.block_table(0)[: -(-cut // 4)] and bm.num_tokens(1) == cut
    copies = []
    for step in range(6):  # both sides write past the fork point
        copies += sim.append(0, [100 + step])[1]
        copies += sim.append(1, [200 + step])[1]
        sim.check()
    assert len(copies) == (1 if cut % 4 else 0)


def test_fork_inside_a_registered_block_after_parent_frees(make):
    bm = make(8, 4)
    sim = KVSim(bm)
    sim.allocate(0, [1, 2, 3, 4, 5])  # block 0 is full and registered
    sim.fork(0, 1, at=2)
    sim.free(0)
    b = bm.block_table(1)[0]
    slots, copies = sim.append(1, [9])  # sole owner: written in place, dropped from the prefix index
    assert copies == [] and slots == [b * 4 + 2]
    assert sim.allocate(2, [1, 2, 3, 4, 5]) == 0
    sim.check()


def test_out_of_blocks_changes_nothing(make):
    bm = make(4, 2)
    bm.allocate(0, [1, 2, 3])
    bm.fork(0, 1)

    def snapshot():
        return (bm.num_free_blocks, {s: (bm.block_table(s), bm.num_tokens(s)) for s in bm.seq_ids()},
                [bm.ref_count(b) for b in range(bm.num_blocks)])

    before = snapshot()
    assert not bm.can_allocate(5)
    with pytest.raises(OutOfBlocksError, match="needs 3 free blocks but only 2"):
        bm.allocate(2, [9, 9, 9, 9, 9])
    assert not bm.can_append(0, 4)  # copy of the shared partial block + 2 new blocks
    with pytest.raises(OutOfBlocksError):
        bm.append(0, 4)
    assert snapshot() == before
    assert bm.can_append(0, 3)
    bm.append(0, 3)
    assert bm.num_free_blocks == 0 and isinstance(OutOfBlocksError("x"), RuntimeError)


def test_errors_name_the_bad_value(make):
    bm = make(8, 4)
    bm.allocate(5, [1, 2])
    with pytest.raises(DuplicateSequenceError, match="5"):
        bm.allocate(5, [1])
    with pytest.raises(DuplicateSequenceError, match="5"):
        bm.fork(5, 5)
    with pytest.raises(UnknownSequenceError, match="77"):
        bm.append(77)
    with pytest.raises(UnknownSequenceError, match="77"):
        bm.fork(77, 78)
    with pytest.raises(InvalidArgumentError, match="at=3"):
        bm.fork(5, 6, at=3)
    with pytest.raises(InvalidArgumentError, match="at=-1"):
        bm.fork(5, 6, at=-1)
    with pytest.raises(InvalidArgumentError, match="n=-2"):
        bm.append(5, -2)
    with pytest.raises(InvalidArgumentError, match="n=-1"):
        bm.can_append(5, -1)
    with pytest.raises(InvalidArgumentError, match="2 token ids for n=3"):
        bm.append(5, 3, [1, 2])
    with pytest.raises(InvalidArgumentError, match="block id 8"):
        bm.ref_count(8)
    with pytest.raises(InvalidArgumentError):
        bm.can_allocate(-1)
    bm.free(5)
    with pytest.raises(UnknownSequenceError, match="already freed") as err:
        bm.free(5)  # double free
    assert isinstance(err.value, KeyError) and isinstance(err.value, BlockManagerError)
    for bad in [(0, 4), (4, 0), (-1, 4)]:
        with pytest.raises(InvalidArgumentError):
            make(*bad)
    assert not bm.has(6) and bm.num_free_blocks == 8


@pytest.mark.parametrize("block_size,caching", [(1, True), (3, True), (4, False)])
def test_random_operations_keep_invariants(make, block_size, caching):
    rng = random.Random(block_size)
    bm = make(24, block_size, enable_prefix_caching=caching)
    sim = KVSim(bm)
    prompts = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]
    next_id = 0
    for _ in range(600):
        live = bm.seq_ids()
        op = rng.random()
        try:
            if op < 0.25 or not live:
                tokens = rng.choice(prompts)[: rng.randrange(13)] + [rng.randrange(3)] * rng.randrange(3)
                fits = bm.can_allocate(len(tokens))
                sim.allocate(next_id, tokens)
                next_id += 1
            elif op < 0.6:
                sid, n = rng.choice(live), rng.randrange(4)
                fits = bm.can_append(sid, n)
                sim.append(sid, [rng.randrange(3) for _ in range(n)], give_ids=rng.random() < 0.8)
                assert fits
            elif op < 0.8:
                sid = rng.choice(live)
                sim.fork(sid, next_id, rng.choice([None, rng.randrange(bm.num_tokens(sid) + 1)]))
                next_id += 1
            else:
                sim.free(rng.choice(live))
        except OutOfBlocksError:
            assert not fits
        sim.check()
    for sid in bm.seq_ids():
        sim.free(sid)
    assert bm.num_free_blocks == bm.num_blocks  # no leaks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


@pytest.mark.parametrize("choice,expected", [("python", "python"), ("auto", None)])
def test_backend_choice_by_environment(choice, expected):
    expected = expected or ("python" if BlockManagerCpp is None else "cpp")
    env = dict(os.environ, ARPO_BLOCK_MANAGER=choice)
    out = subprocess.run([sys.executable, "-c", "import arpo.engine as e; print(e.BLOCK_MANAGER_BACKEND)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
