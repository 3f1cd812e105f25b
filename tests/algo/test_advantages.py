"""Group normalisation and soft / hard attribution against brute force over the trees' paths."""
import pytest
import torch

from arpo.algo.advantages import (
    AGGREGATIONS,
    group_advantages,
    hard_coefficients,
    hard_segment_advantages,
    leaf_weights,
    soft_coefficients,
)
from arpo.algo.synthetic import random_tree


def test_group_advantages_formula():
    r = [1.0, 0.0, 0.5, 0.0, 1.0]
    t = torch.tensor(r, dtype=torch.float64)
    want = (t - t.mean()) / (t.std(unbiased=True) + 1e-6)
    torch.testing.assert_close(group_advantages(r), want)
    assert abs(group_advantages(r).sum().item()) < 1e-9
    assert torch.equal(group_advantages([0.3, 0.3, 0.3]), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(group_advantages([2.0]), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(r, eps=0.5), (t - t.mean()) / (t.std() + 0.5))


def test_leaf_weights_definitions():
    lens = torch.tensor([4, 0, 2, 6])
    torch.testing.assert_close(leaf_weights(lens, "token-mean"), torch.full((4,), 1 / 12, dtype=torch.float64))
    torch.testing.assert_close(leaf_weights(lens, "seq-mean-token-sum"), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(leaf_weights(lens, "seq-mean-token-mean"),
                               torch.tensor([1 / 16, 0.0, 1 / 8, 1 / 24], dtype=torch.float64))
    with pytest.raises(ValueError, match="aggregation='mean'"):
        leaf_weights(lens, "mean")


def membership_of(tree):
    mem = torch.zeros(len(tree.segments), len(tree.leaves), dtype=torch.bool)
    for j, leaf in enumerate(tree.leaves):
        for s in tree.path(leaf):
            mem[s, j] = True
    return mem


@pytest.mark.parametrize("seed", range(4))
def test_soft_and_hard_coefficients_by_brute_force(seed):
    tree = random_tree(seed, n_leaves=7, reward_levels=5)
    adv = group_advantages(tree.rewards())
    w = torch.rand(len(tree.leaves), dtype=torch.float64)
    soft = soft_coefficients(membership_of(tree), adv, w)
    hard_a = hard_segment_advantages(membership_of(tree), adv)
    c = torch.rand(len(tree.segments), dtype=torch.float64)
    hard = hard_coefficients(membership_of(tree), adv, c)
    for s in tree.segments:
        leaves = [j for j, l in enumerate(tree.leaves) if s.id in tree.path(l)]
        assert soft.count[s.id] == len(leaves)
        assert soft.count_pos[s.id] == sum(adv[j] > 0 for j in leaves)
        assert soft.count_neg[s.id] == sum(adv[j] < 0 for j in leaves)
        assert abs(soft.pos[s.id] - sum(w[j] * max(adv[j], 0) for j in leaves)) < 1e-12
        assert abs(soft.neg[s.id] - sum(w[j] * max(-adv[j], 0) for j in leaves)) < 1e-12
        assert abs(soft.weight[s.id] - sum(w[j] for j in leaves)) < 1e-12
        mean = sum(adv[j] for j in leaves) / len(leaves) if leaves else 0.0
        assert abs(hard_a[s.id] - mean) < 1e-12
        assert abs((hard.pos - hard.neg)[s.id] - c[s.id] * mean) < 1e-12
        assert hard.count[s.id] == (1 if leaves else 0)
    # soft pos - neg is the weighted advantage sum: a token's net push is the sum of its leaves' pushes
    torch.testing.assert_close(soft.pos - soft.neg, membership_of(tree).double() @ (w * adv))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_hard_weights_count_each_token_once(agg):
    from arpo.algo.packing import pack_trees

    trees = [random_tree(s, n_leaves=6) for s in range(3)]
    batch = pack_trees(trees)
    w = batch.loss_weights("hard", agg)
    assert torch.equal(w.count, torch.ones_like(w.count))
    if agg == "token-mean":
        torch.testing.assert_close(w.weight.sum(), torch.tensor(1.0))
    if agg == "seq-mean-token-sum":
        torch.testing.assert_close(w.weight, torch.full_like(w.weight, 1 / sum(len(t.leaves) for t in trees)))


def test_bad_mode_raises():
    from arpo.algo.packing import pack_trees

    batch = pack_trees([random_tree(0)])
    with pytest.raises(ValueError, match="mode='medium'"):
        batch.loss_weights("medium")
    with pytest.raises(ValueError, match="aggregation='sum'"):
        batch.loss_weights("hard", "sum")
