"""The C++ and Python block managers, driven in lockstep by hypothesis, must agree on everything.

Each step runs one operation (allocate / append / fork(at) / free, valid or not) on both twins and compares the
results or the exception type and message; after each step both must report the same tables, token counts, ref
counts and free count, and both must pass `check_invariants` (ref counts equal the number of tables holding a
block, so never negative; free count equals unreferenced blocks). Prompts come from a tiny alphabet with shared
prefixes so prefix hits, evictions, copy-on-write and running out of blocks all happen often.
"""
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from arpo.engine.block_manager import BlockManagerCpp, BlockManagerPy, check_invariants

pytestmark = pytest.mark.skipif(BlockManagerCpp is None, reason="arpo._C is not built")

_rng = random.Random(1234)
PROMPTS = [[_rng.randrange(3) for _ in range(16)] for _ in range(3)]


def outcome(fn):
    """What a call did, comparable across twins: ("ok", result) or ("err", type, message)."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the exception itself is the result under test
        return ("err", type(e), str(e))


class Twins(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 20), block_size=st.sampled_from([1, 2, 3, 4]), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.twins = [BlockManagerPy(num_blocks, block_size, caching),
                      BlockManagerCpp(num_blocks, block_size, caching)]
        self.next_id = 0

    def both(self, fn):
        py, cpp = (outcome(lambda: fn(bm)) for bm in self.twins)
        assert py == cpp
        return py

    def pick(self, k):
        live = self.twins[0].seq_ids()
        return live[k % len(live)] if live else k

    def has_live(self):
        return bool(self.twins[0].seq_ids())

    @rule(prompt=st.integers(0, 2), cut=st.integers(0, 16), tail=st.lists(st.integers(0, 2), max_size=6),
          reuse=st.booleans(), k=st.integers(0, 99))
    def allocate(self, prompt, cut, tail, reuse, k):
        tokens = PROMPTS[prompt][:cut] + tail
        sid = self.pick(k) if reuse else self.next_id  # reuse: a duplicate id (or unknown if none live)
        result = self.both(lambda bm: bm.allocate(sid, tokens))
        if result[0] == "ok" and sid == self.next_id:
            self.next_id += 1

    @rule(k=st.integers(0, 99), n=st.integers(-1, 7), give_ids=st.booleans(), token=st.integers(0, 2))
    def append(self, k, n, give_ids, token):
        sid = self.pick(k)
        ids = [token] * max(n, 0) if give_ids else None
        result = self.both(lambda bm: bm.append(sid, n, ids))
        if result[0] == "ok":
            for slot in result[1][0]:  # a shared block is never handed out for writing
                assert self.twins[0].ref_count(slot // self.twins[0].block_size) == 1

    @rule(k=st.integers(0, 99), n=st.integers(-1, 7))
    def can(self, k, n):
        self.both(lambda bm: bm.can_append(self.pick(k), n))
        self.both(lambda bm: bm.can_allocate(n))

    @rule(k=st.integers(0, 99), at=st.one_of(st.none(), st.integers(-1, 30)), dup=st.booleans())
    def fork(self, k, at, dup):
        parent = self.pick(k)
        child = parent if dup else self.next_id
        result = self.both(lambda bm: bm.fork(parent, child, at))
        if result[0] == "ok":
            assert result[1] == []
            if child == self.next_id:
                self.next_id += 1

    @rule(k=st.integers(0, 99), unknown=st.booleans())
    def free(self, k, unknown):
        sid = self.next_id + 1000 if unknown else self.pick(k)
        self.both(lambda bm: bm.free(sid))

    @precondition(has_live)
    @rule()
    def free_all(self):
        for sid in self.twins[0].seq_ids():
            self.both(lambda bm: bm.free(sid))
        assert all(bm.num_free_blocks == bm.num_blocks for bm in self.twins)  # no leaks

    @invariant()
    def same_state(self):
        py, cpp = self.twins
        for bm in self.twins:
            check_invariants(bm)
        assert py.seq_ids() == cpp.seq_ids() and py.num_free_blocks == cpp.num_free_blocks
        for sid in py.seq_ids():
            assert py.block_table(sid) == cpp.block_table(sid)
            assert py.num_tokens(sid) == cpp.num_tokens(sid)
        assert [py.ref_count(b) for b in range(py.num_blocks)] == [cpp.ref_count(b) for b in range(cpp.num_blocks)]

    def teardown(self):
        for sid in self.twins[0].seq_ids() if hasattr(self, "twins") else []:
            self.both(lambda bm: bm.free(sid))
        for bm in getattr(self, "twins", []):
            assert bm.num_free_blocks == bm.num_blocks


Twins.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
TestTwins = Twins.TestCase


def test_long_random_run_gives_identical_tables():
    """A long seeded run (evictions, deep fork trees) that hypothesis' short programs rarely reach."""
    rng = random.Random(7)
    py, cpp = BlockManagerPy(48, 4), BlockManagerCpp(48, 4)
    next_id, hits, out_of_blocks = 0, 0, 0
    for _ in range(4000):
        live, op = py.seq_ids(), rng.random()
        kind = "allocate" if op < 0.2 or not live else "append" if op < 0.65 else "fork" if op < 0.85 else "free"
        if kind == "allocate":
            sid = next_id
            tokens = rng.choice(PROMPTS)[: rng.randrange(17)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
            call = lambda bm: bm.allocate(sid, tokens)  # noqa: E731
        elif kind == "append":
            sid, n = rng.choice(live), rng.randrange(1, 4)
            ids = [rng.randrange(3) for _ in range(n)] if rng.random() < 0.8 else None
            call = lambda bm: bm.append(sid, n, ids)  # noqa: E731
        elif kind == "fork":
            sid, child = rng.choice(live), next_id
            at = rng.randrange(py.num_tokens(sid) + 1)
            call = lambda bm: bm.fork(sid, child, at)  # noqa: E731
        else:
            sid = rng.choice(live)
            call = lambda bm: bm.free(sid)  # noqa: E731
        a, b = outcome(lambda: call(py)), outcome(lambda: call(cpp))
        assert a == b
        next_id += a[0] == "ok" and kind in ("allocate", "fork")
        hits += a[0] == "ok" and kind == "allocate" and a[1] > 0
        out_of_blocks += a[0] == "err"
        for s in py.seq_ids():
            assert py.block_table(s) == cpp.block_table(s)
    check_invariants(py)
    check_invariants(cpp)
    assert hits > 20 and out_of_blocks > 20  # the run did exercise prefix hits and a full pool
