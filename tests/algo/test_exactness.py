"""Tree-packed loss = the loss it stands for (issue 8, part 4), from hidden states to gradients.

Soft mode is compared with naive GRPO on duplicated per-leaf rows (verl's literal formulation, `grpo_row_loss`):
the duplicated rows' hidden states are copies of the packed ones, so the packed hidden gradient must equal the
row gradients summed over the copies, and the lm_head gradient must be equal outright. Hard mode is compared
with a per-token loop over the trees. fp32 throughout, tolerance 1e-5.
"""
import pytest
import torch

from arpo.algo import leaf_rows, pack_trees
from arpo.algo.advantages import AGGREGATIONS
from arpo.algo.rows import grpo_row_loss
from arpo.algo.synthetic import random_tree
from arpo_kernels import linear_logprobs_entropy
from arpo_kernels.policy_loss import segmented_policy_loss_from_hidden

H, V = 16, 50
TOL = dict(rtol=1e-5, atol=1e-5)
OPTIONS = {
    "plain": {},
    "asym-clip": {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 2.0},
    "kl": {"kl_coef": 0.5},
    "aepo": {"entropy_clip": True, "entropy_adv_coef": 0.2},
}


def make_trees(seed, depth1=False, n=3):
    if depth1:  # no branching: every leaf one segment off the prompt
        return [random_tree(seed * 10 + i, n_global=4, n_leaves=4, max_depth=1, seg_len=(1, 6))
                for i in range(n)]
    return [random_tree(seed * 10 + i, n_leaves=5 + i, reward_levels=4) for i in range(n)]


def setup(trees, seed):
    batch, rows = pack_trees(trees), leaf_rows(trees)
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(batch.num_tokens, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.5
    with torch.no_grad():
        lp, _ = linear_logprobs_entropy(hp[batch.pred_index], W, batch.targets)
    # old / ref log-probs near the current ones, so every clip region is visited
    old = lp + torch.randn(lp.shape, generator=g) * 0.4
    ref = lp + torch.randn(lp.shape, generator=g) * 0.4
    return batch, rows, hp, W, old, ref


def packed_loss(batch, hp, W, old, ref, mode, agg, opts):
    hp, W = hp.clone().requires_grad_(), W.clone().requires_grad_()
    loss, metrics = segmented_policy_loss_from_hidden(
        hp, W, batch.targets, old, batch.loss_weights(mode, agg), index=batch.pred_index,
        ref_logprobs=ref if opts.get("kl_coef") else None, **opts)
    loss.backward()
    return loss.detach(), hp.grad, W.grad, metrics


def row_loss(batch, rows, rmap, hp, W, old, ref, agg, opts):
    """Naive GRPO on one row per leaf; returns the hidden gradient folded back onto the packed rows."""
    hd = hp[rmap].clone().requires_grad_()
    W = W.clone().requires_grad_()
    to_target = torch.full((batch.num_tokens,), -1, dtype=torch.long)
    to_target[batch.target_index] = torch.arange(batch.target_index.numel())
    tgt_rows = to_target[rmap[:, 1:]].clamp(min=0)
    mask = rows.loss_mask[:, 1:]
    logp, ent = linear_logprobs_entropy(hd[:, :-1], W, rows.input_ids[:, 1:])
    ref_rows = ref[tgt_rows] if opts.get("kl_coef") else None
    loss, metrics = grpo_row_loss(logp, old[tgt_rows], rows.advantages, mask, agg, ref_logp=ref_rows,
                                  entropy=ent.detach(), **opts)
    loss.backward()
    g = torch.zeros_like(hp).index_add_(0, rmap.flatten(), hd.grad.reshape(-1, H))
    return loss.detach(), g, W.grad, metrics


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("depth1", [False, True], ids=["tree", "depth1"])
def test_soft_equals_duplicated_rows(agg, opts, depth1, row_map):
    trees = make_trees(1, depth1)
    batch, rows, hp, W, old, ref = setup(trees, seed=2)
    rmap = row_map(batch, trees, rows)
    got = packed_loss(batch, hp, W, old, ref, "soft", agg, opts)
    want = row_loss(batch, rows, rmap, hp, W, old, ref, agg, opts)
    assert batch.num_tokens < rmap.numel()
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)
    assert got[3].keys() == want[3].keys()
    for k, v in want[3].items():
        torch.testing.assert_close(got[3][k], v, **TOL, msg=k)
    assert got[2].abs().max() > 1e-3  # the comparison is not between two zeros


def hard_loop_loss(trees, batch, logp, old, agg, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """Hard attribution, token by token: Â = mean over the leaves containing it, each token counted once."""
    n_leaves = sum(len(t.leaves) for t in trees)
    lens, adv_of = [], []
    for t in trees:
        a = batch.advantages[len(adv_of): len(adv_of) + len(t.leaves)]
        adv_of += a.tolist()
        lens += [sum(t.leaf_values(l, "loss_mask")) for l in t.leaves]
    n_unique = sum(sum(sum(s.loss_mask) for s in t.segments) for t in trees)
    total, k, first_leaf = 0.0, 0, 0
    for t in trees:
        for s in t.segments:
            leaves = [j for j, l in enumerate(t.leaves) if s.id in t.path(l)]
            a_bar = sum(adv_of[first_leaf + j] for j in leaves) / max(len(leaves), 1)
            if agg == "token-mean":
                c = 1.0 / n_unique
            elif agg == "seq-mean-token-sum":
                c = 1.0 / n_leaves
            else:
                c = sum(1.0 / (n_leaves * lens[first_leaf + j]) for j in leaves) / max(len(leaves), 1)
            c = c if leaves else 0.0
            for m in s.loss_mask:
                if m:
                    r = torch.exp(logp[k] - old[k])
                    l1, l2 = -a_bar * r, -a_bar * torch.clamp(r, 1 - clip_low, 1 + clip_high)
                    l = torch.maximum(l1, l2)
                    if a_bar < 0:
                        l = torch.minimum(torch.tensor(-a_bar * dual_clip), l)
                    total = total + c * l
                    k += 1
        first_leaf += len(t.leaves)
    assert k == logp.numel()
    return total


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("opts", [{}, {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 2.0}], ids=["plain", "asym"])
def test_hard_equals_per_token_loop(agg, opts):
    trees = make_trees(3)
    batch, _, hp, W, old, _ = setup(trees, seed=4)
    got = packed_loss(batch, hp, W, old, None, "hard", agg, opts)
    hp2, W2 = hp.clone().requires_grad_(), W.clone().requires_grad_()
    logp, _ = linear_logprobs_entropy(hp2[batch.pred_index], W2, batch.targets)
    want = hard_loop_loss(trees, batch, logp, old, agg, **opts)
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), **TOL)
    torch.testing.assert_close(got[1], hp2.grad, **TOL)
    torch.testing.assert_close(got[2], W2.grad, **TOL)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_depth1_hard_equals_soft(agg):
    trees = make_trees(5, depth1=True)
    batch = pack_trees(trees)
    soft, hard = batch.loss_weights("soft", agg), batch.loss_weights("hard", agg)
    assert torch.equal(soft.count, torch.ones_like(soft.count))
    for a, b in zip(soft, hard):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_masked_tokens_contribute_nothing():
    trees = make_trees(7)
    batch, _, hp, W, old, _ = setup(trees, seed=8)
    assert batch.targets.numel() == int(batch.loss_mask.sum())
    assert bool((batch.loss_mask[batch.target_index] == 1).all())
    _, g_hidden, _, _ = packed_loss(batch, hp, W, old, None, "soft", "token-mean", {})
    predicting = torch.zeros(batch.num_tokens, dtype=torch.bool)
    predicting[batch.pred_index] = True
    assert torch.count_nonzero(g_hidden[~predicting]) == 0  # rows that predict no loss token get no gradient
    for t in trees:  # mask everything: nothing left to train
        for s in t.segments:
            s.loss_mask = [0] * len(s)
    empty = pack_trees(trees)
    assert empty.targets.numel() == 0
    loss, g, gw, _ = packed_loss(empty, torch.randn(empty.num_tokens, H), W, empty.old_logprobs, None, "soft",
                                 "token-mean", {})
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0 and torch.count_nonzero(gw) == 0
