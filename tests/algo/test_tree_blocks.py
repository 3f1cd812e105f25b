"""Block-sparse tree attention (`AttentionContext.tree_blocks`) equals the dense ancestor mask, forward and backward."""
import torch

from arpo.algo import pack_trees
from arpo.algo.synthetic import random_tree
from arpo.model import AttentionContext, ModelConfig, Qwen2Model


def _model():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Qwen2Model(cfg).float()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def _grads(model, batch, ctx):
    model.zero_grad()
    hidden = model(batch.input_ids, batch.position_ids, ctx)
    (hidden.sin() * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_blocks_equal_dense_mask():
    model = _model()
    batch = pack_trees([random_tree(s, vocab=50, n_leaves=6, seg_len=(1, 6)) for s in range(3)])
    dense_h, dense_g = _grads(model, batch, AttentionContext.tree(batch.attention_mask()))
    block_h, block_g = _grads(model, batch, AttentionContext.tree_blocks(*batch.node_blocks()))
    torch.testing.assert_close(block_h, dense_h, rtol=1e-5, atol=1e-5)
    for name in dense_g:
        torch.testing.assert_close(block_g[name], dense_g[name], rtol=1e-5, atol=1e-5)
