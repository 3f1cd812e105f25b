"""DAPO's parts (arpo/algo/dapo.py): the overlong penalty on hand values, the dynamic-sampling filter on crafted
rewards, clip-higher in the settings and in the loss."""
import os
from types import SimpleNamespace

import pytest
import torch

from arpo.algo.config import AlgoConfig
from arpo.algo.dapo import (apply_overlong_penalty, dynamic_sampling, informative, merge_stats,
                            overlong_buffer_tokens, overlong_penalty)
from arpo.config import CONFIG_DIR, ConfigError, load_config
from arpo.rollout.tree import ROOT, RolloutTree


@pytest.mark.parametrize("length,want", [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0),
                                         (101, -1.0), (500, -1.0)])
def test_overlong_penalty_hand_values(length, want):
    """L_max = 100, buffer 20: 0 up to 80, a linear ramp to -1 at 100, -1 beyond."""
    assert overlong_penalty(length, 100, 20) == pytest.approx(want)
    assert overlong_penalty(length, 100, 20, factor=0.5) == pytest.approx(want / 2)


def test_overlong_penalty_off_and_bad_buffers():
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(10**6, 100, 0) == 0.0
    assert overlong_buffer_tokens(20480, 0.2) == 4096 and overlong_buffer_tokens(48, 0.5) == 24
    assert overlong_buffer_tokens(48, 0.0) == 0
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(5, 100, 101)
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(5, 100, -1)


def _tree(rewards, lengths=None):
    """One chain per leaf from the root: leaf i has `lengths[i]` response tokens (default 1)."""
    tree = RolloutTree(prompt_ids=[1, 2])
    for i, r in enumerate(rewards):
        n = lengths[i] if lengths else 1
        seg = tree.add_segment(ROOT, [3] * n, [-0.1] * n, [0.5] * n, 1)
        tree.add_leaf(seg.id, reward=r)
    return tree


def test_apply_overlong_penalty_changes_rewards_and_keeps_the_task_reward():
    tree = _tree([1.0, 0.0, 1.0], lengths=[10, 45, 48])
    sums = apply_overlong_penalty([tree], max_length=48, buffer=24)
    assert [l.metadata["task_reward"] for l in tree.leaves] == [1.0, 0.0, 1.0]
    assert tree.rewards() == pytest.approx([1.0, 0.0 - 21 / 24, 1.0 - 1.0])
    assert sums == {"penalty": pytest.approx(-21 / 24 - 1.0), "penalised": 2, "leaves": 3}


def _rounds(*batches):
    """A fake `run_round`: round r returns trees with the crafted rewards of batches[r], and its counters."""
    calls = []

    def run(r):
        calls.append(r)
        return SimpleNamespace(trees=[_tree(rw) for rw in batches[r]],
                               stats={"wall_s": 1.0, "tool_calls": 2, "peak_blocks": 10 + r})
    return run, calls


def test_informative_means_two_different_rewards():
    assert informative(_tree([0.0, 1.0])) and informative(_tree([-1.0, 0.0, 0.0]))
    assert not informative(_tree([1.0, 1.0, 1.0])) and not informative(_tree([0.0, 0.0]))
    assert not informative(_tree([0.5]))  # one leaf: no spread


def test_dynamic_sampling_drops_uniform_prompts_and_refills():
    run, calls = _rounds([[1, 1], [0, 1], [0, 0], [0.5, 0.2]],   # round 0: 2 informative, 2 dropped
                         [[1, 0], [1, 1], [0, -1]],              # round 1: the first refills to 3
                         [[0, 1]])
    out = dynamic_sampling(run, target=3, max_extra_rounds=5)
    assert calls == [0, 1] and out.rounds == 2
    assert [t.rewards() for t in out.kept] == [[0, 1], [0.5, 0.2], [1, 0]]  # in order, cut at the target
    assert out.sampled == 7 and out.dropped == 3 and len(out.rolled) == 7
    assert out.stats == {"wall_s": 2.0, "tool_calls": 4, "peak_blocks": 11}


def test_dynamic_sampling_is_bounded():
    run, calls = _rounds([[1, 1], [0, 1]], [[0, 0]], [[1, 1]], [[0, 1], [1, 0]])
    out = dynamic_sampling(run, target=2, max_extra_rounds=2)  # 3 rounds at most, still 1 short
    assert calls == [0, 1, 2] and [t.rewards() for t in out.kept] == [[0, 1]]
    assert (out.sampled, out.dropped) == (4, 3)
    run, calls = _rounds([[1, 1], [0, 1]], [[0, 1]])
    out = dynamic_sampling(run, target=2, max_extra_rounds=0)  # filter only
    assert calls == [0] and len(out.kept) == 1 and out.dropped == 1
    with pytest.raises(ValueError, match="target"):
        dynamic_sampling(run, target=0, max_extra_rounds=1)


def test_dynamic_sampling_keeps_what_every_rank_can_match():
    """`common` stands for the minimum over data-parallel ranks: another rank short of prompts keeps this one
    sampling, and every rank trains on the same number."""
    run, calls = _rounds([[0, 1], [0, 1]], [[0, 1]], [[0, 1]])
    other_rank = iter([0, 1, 1, 1])  # what the other rank has kept after rounds 0, 1, 2, then the final cut
    out = dynamic_sampling(run, target=2, max_extra_rounds=2, common=lambda n: min(n, next(other_rank)))
    assert calls == [0, 1, 2] and len(out.kept) == 1


def test_merge_stats():
    s = merge_stats({}, {"wall_s": 1.5, "peak_blocks": 4, "note": "x"})
    assert merge_stats(s, {"wall_s": 1.0, "peak_blocks": 3}) == {"wall_s": 2.5, "peak_blocks": 4}


# --- clip-higher and the settings ------------------------------------------------------------------------------

def test_dapo_settings_clip_higher_token_mean_trajectories():
    assert AlgoConfig(name="dapo").upper_clip() == 0.28 and AlgoConfig(name="dapo").clip_low == 0.2
    assert AlgoConfig().upper_clip() == 0.2 and AlgoConfig(name="grpo").upper_clip() == 0.2
    assert AlgoConfig(name="dapo", clip_high=0.3).upper_clip() == 0.3  # an explicit value wins
    assert AlgoConfig(name="arpo", clip_high=0.28).upper_clip() == 0.28
    with pytest.raises(ConfigError, match="token-mean"):
        AlgoConfig(name="dapo", aggregation="seq-mean-token-mean")
    cfg = load_config(None, ["algo=dapo"])
    assert cfg.rollout_mode == "trajectory" and cfg.algo.aggregation == "token-mean"
    preset = os.path.join(CONFIG_DIR, "qwen2.5-3b-h100.yaml")
    assert load_config(preset, ["algo=dapo"]).algo.upper_clip() == 0.28
    assert load_config(preset).algo.upper_clip() == 0.2


@pytest.mark.parametrize("algo,hi", [("dapo", 0.28), ("grpo", 0.2)])
def test_the_loss_clips_at_the_algorithms_bounds(algo, hi):
    """Positive advantage: the ratio's gradient stops above 1 + clip_high; negative: below 1 - clip_low."""
    from arpo.trainer.update import _loss_kwargs
    from arpo_kernels import segmented_policy_loss
    from arpo_kernels.policy_loss import PolicyLossWeights

    kw = _loss_kwargs(SimpleNamespace(algo=AlgoConfig(name=algo)))
    assert (kw["clip_low"], kw["clip_high"]) == (0.2, hi)
    ratios = torch.tensor([1.1, 1.25, 1.3, 0.85, 0.75], dtype=torch.float64)
    pos = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    neg = 1.0 - pos
    one = torch.ones(5, dtype=torch.float64)
    w = PolicyLossWeights(pos=pos, neg=neg, weight=one, count=one, count_pos=pos, count_neg=neg)
    old = torch.zeros(5, dtype=torch.float64)
    logp = ratios.log().clone().requires_grad_(True)
    loss, m = segmented_policy_loss(logp, old, w, **kw)
    loss.backward()
    moving = (logp.grad.abs() > 0).tolist()
    assert moving == [True, 1.25 < 1 + hi, False, True, False]
    assert float(m["clip_frac"]) == pytest.approx((2 + (1.25 > 1 + hi)) / 5)
