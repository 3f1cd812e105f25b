"""The tree rollout on a real engine: formulas enacted, exact budgets, shared blocks, masks, failures, caps, seeds."""
import time

import pytest

from arpo.engine import SamplingParams
from arpo.rollout import RolloutConfig, RolloutTree, TreeRollout
from arpo.rollout.branching import EntropyBrancher
from arpo.rollout.toy_policy import tool_chain_policy
from arpo.tools.base import RESULT_CLOSE, RESULT_OPEN

from rollout_helpers import PROMPTS, FailingTool, HangingTool, JitteryEchoTool, make_engine, make_tools

K = 5


def _run(policy, tool=None, engine_kw=None, tools_kw=None, brancher=None, prompts=PROMPTS, seed=0,
         seed_indices=None, _steps=None, **cfg):
    """`_steps`: a list that receives the time each engine step finished."""
    cfg = {"leaves": 8, "initial": 4, "probe_tokens": K, "max_response_tokens": 120, **cfg}
    engine = make_engine(policy, **(engine_kw or {}))
    if _steps is not None:
        step = engine.step
        engine.step = lambda: (step(), _steps.append(time.perf_counter()))[0]
    tools = make_tools(tool, **(tools_kw or {}))
    ro = TreeRollout(engine, tools, RolloutConfig(**cfg), reward_fn=lambda text, gt, **row: float(len(text) % 3),
                     brancher=brancher)
    try:
        result = ro.run(prompts, seed=seed, seed_indices=seed_indices)
    finally:
        tools.close()
    for t in result.trees:
        t.validate()
    return result.trees, result, engine


def _leaf_of(tree: RolloutTree, key: str):
    return next(l for l in tree.leaves if l.metadata["key"] == key)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_decisions_follow_the_formulas(policy, reduce):
    trees, ro, _ = _run(policy, leaves=10, initial=3, entropy_reduce=reduce)
    agg = (lambda xs: sum(xs)) if reduce == "sum" else (lambda xs: sum(xs) / len(xs))
    n_dec = 0
    for tree in trees:
        P = len(tree.prompt_ids)
        for d in tree.metadata["decisions"]:
            n_dec += 1
            leaf = _leaf_of(tree, d["trajectory"])  # the trajectory's own leaf holds its whole path
            ents, mask = tree.leaf_values(leaf, "entropies"), tree.leaf_values(leaf, "loss_mask")
            i = d["position"] - P
            assert mask[i - 1] == 0 and mask[i] == 1  # the fork point is right after a tool result
            probe = []
            for e, m in zip(ents[i:i + K], mask[i:i + K]):
                if not m:
                    break
                probe.append(e)
            sampled = [e for e, m in zip(ents[:i], mask[:i]) if m] + probe
            h_init, h_t = agg(sampled[:K]), agg(probe)
            assert d["h_init"] == pytest.approx(h_init, abs=1e-9) and d["h_t"] == pytest.approx(h_t, abs=1e-9)
            p = 0.5 + 0.2 * (h_t - h_init) / __import__("math").log(54)
            assert d["p"] == pytest.approx(p, abs=1e-9) and d["branch"] == (d["p"] > 0.5)
            assert d["children"] <= (1 if d["branch"] else 0)
        # every fork in the tree is a positive decision's child
        assert tree.metadata["branches"] == sum(1 for l in tree.leaves if not l.metadata["global"])
    assert n_dec > 3


class ScriptedEntropy(EntropyBrancher):
    """A controlled entropy source: H_t is 3.0 after odd-numbered calls and 0.0 after even ones; H_init 1.0."""

    def decide(self, sampled, probe, **kw):
        return super().decide([1.0], [3.0 if kw["call"] % 2 else 0.0], **kw)


def test_controlled_entropy_drives_the_forks(policy):
    brancher = ScriptedEntropy(alpha=0.5, beta=0.2, tau=0.5, k=K, vocab_size=54)
    trees, _, _ = _run(policy, brancher=brancher, leaves=12, initial=2)
    for tree in trees:
        decisions = tree.metadata["decisions"]
        assert decisions and all(d["branch"] == (d["call"] % 2 == 1) for d in decisions)
        assert all(d["children"] == 0 for d in decisions if d["call"] % 2 == 0)
        forked = {l.metadata["key"].rsplit(".", 2)[0] + "." + l.metadata["key"].rsplit(".", 2)[1]
                  for l in tree.leaves if not l.metadata["global"]}
        assert all(int(k.rsplit(".", 1)[1]) % 2 == 1 for k in forked)  # children only after odd calls


def test_bernoulli_uses_the_pluggable_rng(policy):
    draws = iter([0.1, 0.9] * 1000)
    brancher = EntropyBrancher(alpha=0.5, beta=0.0, rule="bernoulli", k=K, vocab_size=54,
                               uniform=lambda *key: next(draws))
    trees, _, _ = _run(policy, brancher=brancher, sync_tools=True)
    ds = [d for t in trees for d in t.metadata["decisions"]]
    assert ds and all(d["branch"] == (d["u"] < 0.5) for d in ds)


class Always(EntropyBrancher):
    def decide(self, sampled, probe, **kw):
        return super().decide([0.0], [1e6], **kw)


@pytest.mark.parametrize("leaves, initial, beam, mode", [(8, 4, 1, "tree"), (9, 2, 3, "tree"), (5, 5, 2, "tree"),
                                                         (6, 1, 1, "trajectory")])
def test_exactly_m_leaves_and_budget_never_exceeded(policy, leaves, initial, beam, mode):
    brancher = Always(k=K, vocab_size=54)
    trees, ro, engine = _run(policy, brancher=brancher, leaves=leaves, initial=initial, beam=beam, mode=mode)
    for tree in trees:
        assert len(tree.leaves) == leaves
        n_global = tree.metadata["globals"]
        assert n_global + tree.metadata["branches"] == leaves
        if mode == "trajectory":
            assert n_global == leaves and not tree.metadata["decisions"]
        else:
            assert n_global >= initial
            fills = sum(l.metadata["fill"] for l in tree.leaves)
            assert n_global == initial + fills
    assert not engine.seqs and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_children_share_the_parents_blocks(policy):
    engine_kw = {"block_size": 4}
    seen = []
    trees, ro, engine = None, None, None
    from arpo.rollout import tree_rollout

    real_fork = tree_rollout._Run._fork

    def spy(self, st, traj, at, z):
        before = set(self.engine.seqs)
        real_fork(self, st, traj, at, z)
        bm = self.engine.block_manager
        parent = bm.block_table(traj.seq_id)
        for sid in set(self.engine.seqs) - before:
            seen.append((at, parent, bm.block_table(sid)))
    tree_rollout._Run._fork = spy
    try:
        trees, ro, engine = _run(policy, brancher=Always(k=K, vocab_size=54), engine_kw=engine_kw, beam=2)
    finally:
        tree_rollout._Run._fork = real_fork
    assert seen
    for at, parent, child in seen:
        shared = -(-at // 4)  # blocks holding positions [0, at)
        assert child[:shared] == parent[:shared]
    # forking re-prefills nothing: the cache got every tree token once (a leaf's last token is never fed)
    unique = sum(t.num_unique_tokens() for t in trees)
    assert ro.stats["prefill_tokens"] + ro.stats["decode_tokens"] == unique - sum(len(t.leaves) for t in trees)
    assert ro.stats["refed_tokens"] == sum(len(t.leaves) for t in trees)


def test_greedy_children_equal_a_fresh_run_on_the_same_prefix():
    # A chain that closes tags more often than it opens them, and prompts that end inside a call: greedy
    # decoding then calls the tool again and again.
    policy = tool_chain_policy("q", seed=1, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=96,
                               noise=0.01, chain_kw={"p_open": 0.45})
    trees, _, _ = _run(policy, brancher=Always(k=K, vocab_size=54), temperature=0.0, beam=2, leaves=10, initial=2,
                       prompts=["Q: 12*34+5=?<q>12*34+5", "Q: 7*8=?<q>7"], call_in_prompt=True)
    checked = 0
    for tree in trees:
        for d in tree.metadata["decisions"]:
            if not d["children"]:
                continue
            kids = [l for l in tree.leaves if l.metadata["key"].startswith(f"{d['trajectory']}.{d['call']}.")]
            parent = _leaf_of(tree, d["trajectory"])
            i = d["position"] - len(tree.prompt_ids)
            prefix = tree.prompt_ids + tree.leaf_token_ids(parent)[:i]
            runs = [tree.leaf_token_ids(k)[i:i + 8] for k in kids]
            masks = [tree.leaf_values(k, "loss_mask")[i:i + 8] + [0] for k in kids]
            n = min(m.index(0) for m in masks)  # the sampled run before the next tool result
            fresh = make_engine(policy).generate([prefix], SamplingParams(temperature=0, max_tokens=n))[0]
            assert all(r[:n] == fresh.token_ids[:n] for r in runs)
            checked += 1
    assert checked


def test_tool_result_tokens_are_masked(policy):
    trees, _, _ = _run(policy)
    _, tok = policy
    n_results = 0
    for tree in trees:
        for seg in tree.segments:
            runs, start = [], 0
            for j in range(1, len(seg) + 1):
                if j == len(seg) or seg.loss_mask[j] != seg.loss_mask[start]:
                    runs.append((seg.loss_mask[start], start, j))
                    start = j
            for m, a, b in runs:
                if m == 0:
                    text = tok.decode(seg.token_ids[a:b])
                    assert text.startswith(RESULT_OPEN) and text.endswith(RESULT_CLOSE)
                    assert set(seg.logprobs[a:b]) == {0.0} and set(seg.entropies[a:b]) == {0.0}
                    n_results += 1
                else:
                    assert all(lp <= 0.0 for lp in seg.logprobs[a:b])
        for leaf in tree.leaves:
            assert leaf.tool_calls == len(leaf.metadata["tool_ok"])
    assert n_results > 3


@pytest.mark.parametrize("tool, kw", [(FailingTool(), {}), (HangingTool(), {"tool_timeout_s": 0.3})])
def test_failing_or_hanging_tools_never_abort(policy, tool, kw):
    t0 = time.perf_counter()
    trees, ro, _ = _run(policy, tool=tool, max_tool_calls=2, **kw)
    assert time.perf_counter() - t0 < 120  # a generous bound (a loaded machine): it returns, it does not hang
    assert all(len(t.leaves) == 8 for t in trees)
    oks = [ok for t in trees for l in t.leaves for ok in l.metadata["tool_ok"]]
    assert oks and not any(oks)
    texts = " ".join(l.text for t in trees for l in t.leaves)
    assert ("boom" in texts) if isinstance(tool, FailingTool) else ("deadline" in texts)


def test_length_cap_ends_cleanly(policy):
    cap = 30
    trees, _, engine = _run(policy, max_response_tokens=cap, leaves=6, initial=3)
    lens = [len(t.leaf_token_ids(l)) for t in trees for l in t.leaves]
    assert max(lens) <= cap
    assert {l.finish_reason for t in trees for l in t.leaves} <= {"stop", "length"}
    assert any(l.finish_reason == "length" for t in trees for l in t.leaves)
    assert not engine.seqs


def test_call_limit_as_text(policy):
    trees, _, _ = _run(policy, max_tool_calls=1, max_response_tokens=200, over_limit="text")
    calls = [l.tool_calls for t in trees for l in t.leaves]
    assert max(calls) == 1
    assert any(l.text.count("</q>") > 1 for t in trees for l in t.leaves)  # later tags stayed plain text
    assert not any(l.finish_reason == "call_limit" for t in trees for l in t.leaves)
    trees, _, _ = _run(policy, max_tool_calls=0, over_limit="text")
    assert all(l.tool_calls == 0 and not t.metadata["decisions"] for t in trees for l in t.leaves)


def test_call_limit_ends_the_trajectory_at_the_next_call(policy):
    """over_limit=end (the default; the reference appends EOS): the call past the limit is the trajectory's last
    text — closing tag included, nothing run, no result, nothing sampled after it."""
    trees, ro, _ = _run(policy, max_tool_calls=1, max_response_tokens=200)
    leaves = [(t, l) for t in trees for l in t.leaves]
    assert max(l.tool_calls for _, l in leaves) == 1
    ended = [(t, l) for t, l in leaves if l.finish_reason == "call_limit"]
    assert ended  # the toy policy keeps calling
    for t, l in ended:
        assert l.tool_calls == 1 and l.text.count(RESULT_CLOSE.strip()) == 1  # only the first call got a result
        after = l.text.split(RESULT_CLOSE.strip())[1]
        assert after.endswith("</q>") and after.count("</q>") == 1  # ended at the first closing tag after it
        assert t.leaf_values(l, "loss_mask")[-1] == 1  # the closing tag was sampled; nothing was appended
    assert all(l.text.split(RESULT_CLOSE.strip())[-1].count("</q>") <= 1 for _, l in leaves if l.tool_calls)
    assert ro.stats["tool_calls"] == sum(1 for _, l in leaves if l.metadata["global"] and l.tool_calls)  # none run
    trees, _, _ = _run(policy, max_tool_calls=0)
    assert all(l.tool_calls == 0 and not t.metadata["decisions"] for t in trees for l in t.leaves)
    assert all(l.text.count("</q>") <= 1 for t in trees for l in t.leaves)
    assert any(l.finish_reason == "call_limit" for t in trees for l in t.leaves)


def test_same_seed_same_trees(policy):
    a = [t.to_json() for t in _run(policy, sync_tools=True, seed=5)[0]]
    b = [t.to_json() for t in _run(policy, sync_tools=True, seed=5)[0]]
    c = [t.to_json() for t in _run(policy, sync_tools=True, seed=6)[0]]
    assert a == b and a != c
    assert all(RolloutTree.from_json(s).to_json() == s for s in a)


def test_sync_tools_overlap_the_next_step_and_stay_deterministic(policy):
    """Under sync_tools a call made after step s runs while step s+1 decodes the others and lands right after it:
    tools of random latency give identical trees, and the engine stepped while calls were running."""
    steps: list[float] = []
    jittery = JitteryEchoTool(steps)
    runs = []
    for _ in range(2):
        trees, ro, engine = _run(policy, tool=jittery, sync_tools=True, seed=5, _steps=steps)
        runs.append([t.to_json() for t in trees])
    assert runs[0] == runs[1]
    assert ro.stats["tool_calls"] > 3
    overlapped = sum(1 for t in steps if any(a < t < b for a, b in jittery.spans))
    assert overlapped > 0


def _shape(tree: RolloutTree) -> list:
    return [(s.parent, s.token_ids, s.loss_mask) for s in tree.segments]


def test_seed_indices_make_a_prompts_tree_independent_of_its_batch(policy):
    """What a data-parallel rank relies on: a prompt keyed by its place in the global batch grows the same tree
    alone as among the others (and a different key gives a different tree). Log-probs agree to float rounding:
    a batch of one runs other matmul shapes."""
    both = _run(policy, sync_tools=True, seed=5)[0][1]
    alone = _run(policy, sync_tools=True, seed=5, prompts=PROMPTS[1:2], seed_indices=[1])[0][0]
    assert _shape(alone) == _shape(both)
    for a, b in zip(alone.segments, both.segments):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    moved = _run(policy, sync_tools=True, seed=5, prompts=PROMPTS[1:2], seed_indices=[7])[0][0]
    assert _shape(moved) != _shape(both)
    with pytest.raises(ValueError, match="seed_indices has 1 entries for 2 prompts"):
        _run(policy, seed_indices=[0])


def test_resubmit_mode_builds_the_same_tree_with_more_prefill(policy):
    brancher = Always(k=K, vocab_size=54)
    fork, ro_f, _ = _run(policy, brancher=brancher, sync_tools=True, temperature=0.0, initial=2)
    resub, ro_r, _ = _run(policy, brancher=brancher, sync_tools=True, temperature=0.0, initial=2,
                          prefix_mode="resubmit", engine_kw={"enable_prefix_caching": False})
    for f, r in zip(fork, resub):
        assert [s.token_ids for s in f.segments] == [s.token_ids for s in r.segments]
        assert [s.parent for s in f.segments] == [s.parent for s in r.segments]
    assert ro_r.stats["prefill_tokens"] > ro_f.stats["prefill_tokens"]


def test_aepo_options(policy):
    trees, _, _ = _run(policy, aepo_dynamic_budget=True, aepo_branch_penalty=True, leaves=8, initial=4)
    for t in trees:
        assert len(t.leaves) == 8
        m = t.metadata["dynamic_globals"]
        assert m is None or 1 <= m <= 8
        for d in t.metadata["decisions"]:
            base = 0.5 + 0.2 * d["delta_h"]
            assert d["p"] == pytest.approx(base * max(0.0, 1 - 0.05 * d["consecutive"]))


def test_decode_overlap_gives_the_serial_trees_and_counts_dropped_steps(policy):
    """Forks between steps drop the step launched ahead; the rollout reports how many, and the trees are the
    serial engine's."""
    kw = dict(brancher=Always(k=K, vocab_size=54), beam=2)
    serial, ro_s, _ = _run(policy, engine_kw={"decode_graphs": "eager", "decode_overlap": "off"}, **kw)
    ahead, ro_a, engine = _run(policy, engine_kw={"decode_graphs": "eager", "decode_overlap": "on"}, **kw)
    ids = lambda trees: [[t.leaf_token_ids(l) for l in t.leaves] for t in trees]  # noqa: E731
    assert ids(ahead) == ids(serial)
    assert ro_s.stats["dropped_steps"] == 0
    assert ro_a.stats["dropped_steps"] == engine.stats["dropped_steps"] > 0
