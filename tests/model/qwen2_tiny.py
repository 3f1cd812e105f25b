"""Helpers for the model tests: tiny random Qwen2 checkpoints written by transformers itself (the peer our model
must match), HF logits for ragged batches, and packing."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

# GQA ratios 2, 7 and 1; tied and untied heads; rope_theta from 5e3 to 1e6; odd vocabularies; an explicit
# head_dim that differs from hidden_size / num_heads.
TINY_CONFIGS = {
    "gqa2-tied": dict(vocab_size=1003, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "gqa7-untied": dict(vocab_size=1003, hidden_size=56, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=5000.0),
    "mha-headdim": dict(vocab_size=517, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
                        rope_theta=1e6),
}


def make_hf_model(name: str, seed: int = 0):
    """A random `Qwen2ForCausalLM` in fp32 whose every parameter (biases and norms included) is non-trivial."""
    kw = dict(TINY_CONFIGS[name])
    theta = kw.pop("rope_theta")
    cfg = transformers.Qwen2Config(
        **kw, rope_parameters={"rope_type": "default", "rope_theta": theta}, rms_norm_eps=1e-6
    )
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def hf_padded_logits(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """HF logits for a ragged batch, right-padded with an attention mask; one [len, V] tensor per sequence."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]


def pack(seqs: list[list[int]]):
    """Flat ids, per-sequence positions and cu_seqlens for a list of sequences."""
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    return ids, pos, cu
