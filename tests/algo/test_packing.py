"""Tree packing: layout, positions, ancestor mask and predecessors against the per-leaf rows; and with the real
model, packed-tree log-probs and training gradients equal per-leaf forwards (fp32, 1e-5)."""
import pytest
import torch

from arpo.algo import leaf_rows, pack_trees
from arpo.algo.rows import grpo_row_loss
from arpo.algo.synthetic import arpo_tree, random_tree


def trees_for(seed):
    return [random_tree(seed * 7 + i, n_leaves=4 + i) for i in range(3)]


@pytest.mark.parametrize("seed", range(3))
def test_layout_matches_leaf_rows(seed, row_map):
    trees = trees_for(seed)
    batch, rows = pack_trees(trees), leaf_rows(trees)
    rmap = row_map(batch, trees, rows)
    valid = torch.arange(rows.input_ids.shape[1])[None, :] < rows.lengths[:, None]
    assert torch.equal(batch.input_ids[rmap][valid], rows.input_ids[valid])
    depth = torch.arange(rows.input_ids.shape[1]).expand_as(rmap)
    assert torch.equal(batch.position_ids[rmap][valid], depth[valid])  # position = depth along the path
    assert torch.equal(batch.loss_mask[rmap][valid], rows.loss_mask[valid])
    assert batch.num_tokens == sum(t.num_unique_tokens() for t in trees)
    assert batch.num_duplicated_tokens == rows.num_tokens == sum(t.num_leaf_tokens() for t in trees)
    assert torch.equal(batch.leaf_lengths, rows.loss_mask.sum(1))
    assert torch.equal(batch.advantages, rows.advantages)


@pytest.mark.parametrize("seed", range(3))
def test_mask_and_predecessors_follow_each_leaf_row(seed, row_map):
    trees = trees_for(seed)
    batch, rows = pack_trees(trees), leaf_rows(trees)
    rmap = row_map(batch, trees, rows)
    mask = batch.attention_mask()
    pred = dict(zip(batch.target_index.tolist(), batch.pred_index.tolist()))
    old = dict(zip(batch.target_index.tolist(), batch.old_logprobs.tolist()))
    seen = set()
    for r in range(rmap.shape[0]):
        n = int(rows.lengths[r])
        path = rmap[r, :n]
        for p in range(n):
            q = int(path[p])
            # keys of q are exactly the tokens before it on (any) leaf row through it
            assert set(mask[q].nonzero()[:, 0].tolist()) == set(path[: p + 1].tolist())
            if rows.loss_mask[r, p]:
                assert pred[q] == int(path[p - 1])
                assert old[q] == pytest.approx(float(rows.old_logprobs[r, p]))
                seen.add(q)
    assert seen == set(batch.target_index.tolist())
    assert int(mask.sum()) < mask.numel() // 2  # trees do not see each other


def test_ancestors_and_bad_inputs():
    tree = random_tree(4, n_leaves=6)
    batch = pack_trees([tree])
    anc = batch.node_ancestors()
    for s in tree.segments:
        chain, p = {0, s.id + 1}, s.parent
        while p != -1:
            chain.add(p + 1)
            p = tree.segments[p].parent
        assert set(anc[s.id + 1].nonzero()[:, 0].tolist()) == chain
    with pytest.raises(ValueError, match="2 advantages for 6 leaves"):
        pack_trees([tree], advantages=[[0.1, 0.2]])
    with pytest.raises(ValueError, match="at least one tree"):
        pack_trees([])


# ---- with the real model ------------------------------------------------------------------------------------
# the three architectures' layer variants: Qwen2 (q/k/v bias), Qwen3 (q/k norm, YaRN), Llama (all biases, llama3)
ARCHS = {
    "qwen2": {},
    "qwen3": dict(model_type="qwen3", qkv_bias=True, o_proj_bias=True, qk_norm=True,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama": dict(model_type="llama", qkv_bias=True, o_proj_bias=True, mlp_bias=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def tiny_model(arch: str = "qwen2"):
    from arpo.model import CausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0, **ARCHS[arch])
    torch.manual_seed(0)
    model = CausalLM(cfg).float()
    for p in model.parameters():  # default inits are small: widen them so log-probs vary
        torch.nn.init.normal_(p, std=0.3)
    return model


def model_trees():
    return [random_tree(11, vocab=64, n_leaves=5),
            arpo_tree(2, vocab=64, prompt_len=5, n_leaves=4, n_global=2, depth=3, seg_len=4, result_len=2)]


def per_leaf_logprobs(model, rows):
    """Each leaf forwarded on its own (one causal sequence): log-prob of every next token, [R, Lmax - 1]."""
    out = torch.zeros(rows.input_ids.shape[0], rows.input_ids.shape[1] - 1)
    for r in range(out.shape[0]):
        ids = rows.input_ids[r, : rows.lengths[r]]
        h = model(ids, torch.arange(ids.numel()))
        lp = torch.log_softmax(h[:-1] @ model.lm_head_weight.T, -1).gather(1, ids[1:, None])[:, 0]
        out[r, : lp.numel()] = lp
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logprobs_equal_per_leaf_forwards(row_map, arch):
    from arpo.model import AttentionContext

    model, trees = tiny_model(arch), model_trees()
    batch, rows = pack_trees(trees), leaf_rows(trees)
    rmap = row_map(batch, trees, rows)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, AttentionContext.tree(batch.attention_mask()))
        lp = torch.log_softmax(hidden[batch.pred_index] @ model.lm_head_weight.T, -1)
        packed = lp.gather(1, batch.targets[:, None])[:, 0]
        want = per_leaf_logprobs(model, rows)
    to_target = torch.full((batch.num_tokens,), -1, dtype=torch.long)
    to_target[batch.target_index] = torch.arange(batch.target_index.numel())
    mask = rows.loss_mask[:, 1:].bool()
    got = packed[to_target[rmap[:, 1:]].clamp(min=0)]
    assert mask.sum() > batch.targets.numel()  # shared tokens are checked once per leaf
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_training_gradients_equal_duplicated_rows(agg, row_map, arch):
    """Soft-mode loss through the whole model: every parameter gradient equals naive GRPO on leaf rows."""
    from arpo.model import AttentionContext
    from arpo_kernels import linear_logprobs_entropy
    from arpo_kernels.policy_loss import segmented_policy_loss_from_hidden

    model, trees = tiny_model(arch), model_trees()
    batch, rows = pack_trees(trees), leaf_rows(trees)
    rmap = row_map(batch, trees, rows)
    g = torch.Generator().manual_seed(3)
    old = batch.old_logprobs * 0.0 - 4.0 + torch.randn(batch.targets.numel(), generator=g)
    hidden = model(batch.input_ids, batch.position_ids, AttentionContext.tree(batch.attention_mask()))
    loss, _ = segmented_policy_loss_from_hidden(hidden, model.lm_head_weight, batch.targets, old,
                                                batch.loss_weights("soft", agg), index=batch.pred_index)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # one row per leaf, as a varlen batch of causal sequences
    lens = rows.lengths
    flat_ids = torch.cat([rows.input_ids[r, : lens[r]] for r in range(len(lens))])
    flat_pos = torch.cat([torch.arange(int(n)) for n in lens])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    h = model(flat_ids, flat_pos, AttentionContext.varlen(cu))
    h_rows = torch.stack([torch.cat([h[cu[r]: cu[r + 1]], h.new_zeros(rows.input_ids.shape[1] - int(lens[r]),
                                                                     h.shape[-1])]) for r in range(len(lens))])
    to_target = torch.full((batch.num_tokens,), -1, dtype=torch.long)
    to_target[batch.target_index] = torch.arange(batch.target_index.numel())
    logp, _ = linear_logprobs_entropy(h_rows[:, :-1], model.lm_head_weight, rows.input_ids[:, 1:])
    want, _ = grpo_row_loss(logp, old[to_target[rmap[:, 1:]].clamp(min=0)], rows.advantages, rows.loss_mask[:, 1:],
                            agg)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_node_blocks_give_the_dense_mask_attention():
    import torch.nn.functional as F

    batch = pack_trees(trees_for(1))
    q_rows, kv_rows, allowed = batch.node_blocks()
    L, D = batch.num_tokens, 8
    q, k, v = torch.randn(3, 2, L, D).unbind(0)
    dense = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=batch.attention_mask()[None, None])[0]
    qi, ki = q_rows.clamp(min=0), kv_rows.clamp(min=0)
    # padded query rows get one dummy key so that softmax stays finite; they are dropped afterwards
    allowed = allowed | ((q_rows < 0)[:, :, None] & (torch.arange(ki.shape[1]) == 0))
    blocks = F.scaled_dot_product_attention(q[:, qi].transpose(0, 1), k[:, ki].transpose(0, 1),
                                            v[:, ki].transpose(0, 1), attn_mask=allowed[:, None])
    out = torch.zeros_like(dense)
    valid = q_rows >= 0
    out[:, q_rows[valid]] = blocks.transpose(0, 1)[:, valid]
    assert int(valid.sum()) == L  # every token is a query exactly once
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_batch_on_cuda(mode):
    batch = pack_trees(trees_for(0))
    on_gpu = batch.to("cuda")
    for a, b in zip(on_gpu.loss_weights(mode, "token-mean"), batch.loss_weights(mode, "token-mean")):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b)
    assert torch.equal(on_gpu.attention_mask().cpu(), batch.attention_mask())
    assert all(t.is_cuda for t in on_gpu.node_blocks())
