"""Tree attention without a dense mask — block-sparse (`AttentionContext.tree_blocks`, the CPU trainer) and the
interval kernel (`tree_intervals`, the CUDA trainer) — equals the dense ancestor mask, forward and backward."""
import torch

from arpo.algo import pack_trees
from arpo.algo.synthetic import random_tree
from arpo.model import AttentionContext, ModelConfig, Qwen2Model
from arpo.trainer.update import token_stats, tree_context
from arpo_kernels import segmented_policy_loss
from arpo_kernels._backend import forced_backend


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


def test_intervals_kernel_equals_dense_mask():
    """The Triton tree-attention kernel (the CUDA trainer's path; here under the interpreter) in the whole model."""
    model = _model()
    batch = pack_trees([random_tree(s, vocab=50, n_leaves=5, seg_len=(1, 6)) for s in range(2)])
    dense_h, dense_g = _grads(model, batch, AttentionContext.tree(batch.attention_mask()))
    with forced_backend("triton"):
        kern_h, kern_g = _grads(model, batch, AttentionContext.tree_intervals(*batch.token_intervals()))
    torch.testing.assert_close(kern_h, dense_h, rtol=1e-5, atol=1e-5)
    for name in dense_g:
        torch.testing.assert_close(kern_g[name], dense_g[name], rtol=1e-5, atol=1e-5)


def test_trainer_loss_and_gradients_equal_the_dense_path():
    """`token_stats` + the segmented loss, as `_micro_step` runs them: same loss and gradients for the CPU
    trainer's context (blocks), the CUDA trainer's (interval kernel) and the dense-mask reference."""
    model = _model()
    batch = pack_trees([random_tree(s, vocab=50, n_leaves=5, seg_len=(1, 6)) for s in range(2)])
    assert tree_context(batch).kind == "blocks"  # on the CPU

    def loss_and_grads(ctx):
        model.zero_grad()
        logp, ent = token_stats(model, batch, 1.0, False, ctx)
        loss, _ = segmented_policy_loss(logp, batch.old_logprobs, batch.loss_weights("soft", "token-mean"),
                                        entropy=ent.detach())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_l, dense_g = loss_and_grads(AttentionContext.tree(batch.attention_mask()))
    cases = {"blocks": loss_and_grads(tree_context(batch))}
    with forced_backend("triton"):
        cases["intervals"] = loss_and_grads(AttentionContext.tree_intervals(*batch.token_intervals()))
    for kind, (loss, grads) in cases.items():
        torch.testing.assert_close(loss, dense_l, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind}: {m}")
        for name in dense_g:
            torch.testing.assert_close(grads[name], dense_g[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{kind} {name}: {m}")
