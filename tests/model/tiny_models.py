"""Helpers for the model tests: tiny random checkpoints of each supported architecture written by transformers
itself (the peer our model must match), HF logits for ragged batches, and packing."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

HF_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "llama": ("LlamaConfig", "LlamaForCausalLM")}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
# Llama 3.1's published parameters, with the original context shrunk so all three frequency bands are hit
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# GQA ratios 1, 2 and 7; tied and untied heads; rope_theta from 5e3 to 1e6; odd vocabularies; explicit head_dims
# that differ from hidden_size / num_heads; YaRN (default and explicit betas/attention factor) and llama3 RoPE;
# Qwen3 with and without attention bias, Llama with attention and MLP bias.
TINY_CONFIGS = {
    "gqa2-tied": dict(arch="qwen2", vocab_size=1003, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "gqa7-untied": dict(arch="qwen2", vocab_size=1003, hidden_size=56, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=5000.0),
    "mha-headdim": dict(arch="qwen2", vocab_size=517, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
                        rope_theta=1e6),
    "qwen2-yarn": dict(arch="qwen2", vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e4,
                       max_position_embeddings=128, rope=YARN),
    "qwen3-gqa2-tied": dict(arch="qwen3", vocab_size=401, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                            rope_theta=1e6),
    "qwen3-bias-yarn": dict(arch="qwen3", vocab_size=389, hidden_size=56, intermediate_size=72, num_hidden_layers=2,
                            num_attention_heads=7, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
                            attention_bias=True, rope_theta=1e4, max_position_embeddings=96,
                            rope=dict(YARN, factor=3.0, beta_fast=16, beta_slow=2, attention_factor=0.9)),
    "llama3-gqa2": dict(arch="llama", vocab_size=353, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5e5,
                        max_position_embeddings=512, rope=LLAMA3),
    "llama-bias-headdim": dict(arch="llama", vocab_size=257, hidden_size=48, intermediate_size=80,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=20,
                               tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_theta=1e4),
}
ARCH_OF = {name: kw["arch"] for name, kw in TINY_CONFIGS.items()}


def hf_config(name: str, **extra):
    kw = dict(TINY_CONFIGS[name], **extra)
    config_cls = getattr(transformers, HF_CLASSES[kw.pop("arch")][0])
    rope = dict(kw.pop("rope", {"rope_type": "default"}), rope_theta=kw.pop("rope_theta"))
    return config_cls(**kw, rope_parameters=rope, rms_norm_eps=1e-6)


def hf_model_class(name: str):
    return getattr(transformers, HF_CLASSES[ARCH_OF[name]][1])


def make_hf_model(name: str, seed: int = 0, **extra):
    """A random HF causal LM in fp32 whose every parameter (biases and norms included) is non-trivial."""
    model = hf_model_class(name)(hf_config(name, **extra)).float().eval()
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
