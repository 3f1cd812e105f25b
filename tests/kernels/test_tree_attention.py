"""tree_attention: the Triton kernel (under the interpreter on CPU) equals dense-mask attention over the packed
batch's ancestor mask, forward and backward, on trees of every awkward shape; the interval arrays are that mask."""
import random

import pytest
import torch
import torch.nn.functional as F

from arpo.algo import pack_trees
from arpo.algo.synthetic import random_tree
from arpo.rollout.tree import ROOT, RolloutTree
from arpo_kernels._backend import forced_backend
from arpo_kernels.tree_attention import tree_attention, tree_attention_reference, tree_mask


def shaped_tree(prompt_len: int, segments: list[tuple[int, int]], seed: int = 0) -> RolloutTree:
    """A tree of (parent, length) segments; every segment without children ends a leaf."""
    rng = random.Random(seed)
    tree = RolloutTree(prompt_ids=[rng.randrange(50) for _ in range(prompt_len)], prompt="t")
    for parent, n in segments:
        tree.add_segment(parent, [rng.randrange(50) for _ in range(n)], [-0.5] * n, [1.0] * n, 1)
    parents = {p for p, _ in segments}
    for s in range(len(segments)):
        if s not in parents:
            tree.add_leaf(s, reward=1.0)
    return tree


TREES = {
    "single node": [(5, [(ROOT, 1)])],  # 6 tokens: a prompt and one token
    "chain": [(3, [(ROOT, 4), (0, 7), (1, 2), (2, 9)])],
    "wide fan": [(6, [(ROOT, 3 + i % 4) for i in range(9)])],
    "deep nest": [(2, [(i - 1 if i else ROOT, 2 + i % 3) for i in range(12)])],
    "length-1 nodes": [(1, [(ROOT, 1), (0, 1), (0, 1), (1, 1), (3, 1), (2, 1), (ROOT, 1)])],
    # 16-token tiles (the interpreter's): nodes starting and ending exactly on tile edges, and one past them
    "tile edges": [(16, [(ROOT, 16), (0, 16), (ROOT, 15), (2, 17), (0, 32)])],
    "several roots": [(4, [(ROOT, 5), (0, 3), (0, 6)]), (7, [(ROOT, 9), (ROOT, 2)]), (16, [(ROOT, 16)])],
}


def packed(name: str):
    return pack_trees([shaped_tree(p, segs, seed=i) for i, (p, segs) in enumerate(TREES[name])])


def dense_reference(q, k, v, mask, scale):
    """fp32 SDPA with the packed batch's own dense ancestor mask (independent of the interval arrays)."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1),
        v.float().repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask[None], scale=scale)
    return out.transpose(0, 1)


def run_both(batch, hq, hkv, d, dtype, **blocks):
    t = batch.num_tokens
    g = torch.Generator().manual_seed(t * 31 + hq)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    do = torch.randn(t, hq, d, generator=g).to(dtype)
    enter, exit = batch.token_intervals()
    with forced_backend("triton"):
        out = tree_attention(q, k, v, enter, exit, d**-0.5, **blocks)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = dense_reference(q, k, v, batch.attention_mask(), d**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    return (out, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("name", list(TREES))
def test_intervals_are_the_ancestor_mask(name):
    batch = packed(name)
    assert torch.equal(tree_mask(*batch.token_intervals()), batch.attention_mask())


def test_intervals_on_random_forests():
    for seed in range(6):
        batch = pack_trees([random_tree(seed * 10 + i, n_leaves=7, seg_len=(0, 5)) for i in range(3)])
        assert torch.equal(tree_mask(*batch.token_intervals()), batch.attention_mask())


@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (7, 1)])  # GQA ratios 1, 2, 7
def test_fp32_forward_and_backward_equal_dense_mask(name, hq, hkv):
    got, want = run_both(packed(name), hq, hkv, 16, torch.float32)
    for a, b, what in zip(got, want, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("d", [8, 24, 64])  # padded to 16, not a power of two, a real head dim
def test_head_dims(d):
    got, want = run_both(packed("chain"), 4, 2, d, torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_unequal_query_and_key_tiles(block_m, block_n):
    got, want = run_both(packed("tile edges"), 4, 2, 16, torch.float32, block_m=block_m, block_n=block_n)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["wide fan", "several roots"])
def test_bf16(name):
    got, want = run_both(packed(name), 4, 2, 32, torch.bfloat16)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_random_forest_with_strided_inputs():
    """q, k, v as views of one fused projection (the model's layout: row stride > Hq * D)."""
    batch = pack_trees([random_tree(s, n_leaves=6, seg_len=(1, 6)) for s in range(3)])
    t, hq, hkv, d = batch.num_tokens, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, requires_grad=True)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    enter, exit = batch.token_intervals()
    with forced_backend("triton"):
        (g,) = torch.autograd.grad(tree_attention(q, k, v, enter, exit).sum(), qkv)
    (g_ref,) = torch.autograd.grad(dense_reference(q, k, v, batch.attention_mask(), d**-0.5).sum(), qkv)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_reference_equals_dense_mask_attention():
    batch = packed("several roots")
    t = batch.num_tokens
    q, k, v = torch.randn(t, 6, 8), torch.randn(t, 3, 8), torch.randn(t, 3, 8)
    torch.testing.assert_close(tree_attention_reference(q, k, v, *batch.token_intervals()),
                               dense_reference(q, k, v, batch.attention_mask(), 8**-0.5), rtol=1e-5, atol=1e-6)


def test_checks_name_the_bad_argument():
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    enter = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tree_attention(q, k, k, enter, enter)
    with pytest.raises(ValueError, match="exit must be"):
        tree_attention(q, q, q, enter, enter.float())
