"""A scripted policy that is a real Qwen2 model: a character bigram chain wired into the weights.

An untrained tiny model never writes `</python>`, so it cannot exercise tool calls, pauses, probes or branching.
This builds a model of the same shape whose logits are (almost) a bigram table — estimated from text
(`bigram_log_probs`) or written by hand (`tool_chain_log_probs`, a chain that keeps writing `<python>12*3</python>`)
— so calls are made, results appended and branches forked, all through the normal engine path (paged attention,
sampler, fork, extend).

Construction (hidden size >= vocab): one-hot embeddings; every attention and MLP output projection is small
random noise (so the residual stream stays ≈ the current token's one-hot, and the context shifts the logits a
little: entropies vary, forks are not trivially identical); the final RMSNorm turns the one-hot into
√H·e_a, and `lm_head[b, a] = log T[a, b] / √H` gives logits ≈ log T[a, ·]. Used by the rollout tests, the rollout
benchmark and `arpo rollout` when no checkpoint is given.
"""
from __future__ import annotations

import math

import torch


def bigram_log_probs(sequences: list[list[int]], vocab_size: int, smoothing: float = 0.05) -> torch.Tensor:
    """[V, V] log P(next = b | current = a) from token sequences, add-`smoothing` (Laplace)."""
    counts = torch.full((vocab_size, vocab_size), float(smoothing), dtype=torch.float64)
    for ids in sequences:
        for a, b in zip(ids[:-1], ids[1:]):
            counts[a, b] += 1.0
    return (counts / counts.sum(-1, keepdim=True)).log().float()


def bigram_qwen2(log_probs: torch.Tensor, *, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                 kv_heads: int = 2, intermediate_size: int = 384, noise: float = 0.002, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None, max_position_embeddings: int = 4096):
    """A CausalLM whose next-token distribution is ≈ the bigram table (see the module docstring)."""
    from arpo.model import CausalLM
    from arpo.model.config import ModelConfig

    V = log_probs.shape[0]
    if log_probs.shape != (V, V):
        raise ValueError(f"log_probs must be [V, V], got {tuple(log_probs.shape)}")
    if hidden_size < V:
        raise ValueError(f"hidden_size={hidden_size} must be >= vocab size {V} for one-hot embeddings")
    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by heads={heads}")
    cfg = ModelConfig(vocab_size=V, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden_size // heads, tie_word_embeddings=False,
                      max_position_embeddings=max_position_embeddings)
    g = torch.Generator().manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "o_proj" in name or "down_proj" in name:
                p.copy_(noise * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, :V] = torch.eye(V)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :V] = log_probs.t() / math.sqrt(hidden_size)
    return model.to(dtype=dtype, device=device).eval()


def tool_chain_log_probs(tokenizer, tag: str = "python", *, p_open: float = 0.55, p_eos: float = 0.15,
                         eps: float = 1e-3) -> torch.Tensor:
    """[V, V] log-probs of a hand-written chain that keeps calling the tool `tag` with arithmetic content.

    `<` opens (`<tag>`, prob `p_open`) or closes (`</tag>`); the tag's letters follow each other (they must be
    distinct); after `>` come digits, another `<`, or EOS (`p_eos`); digits run on, with `*`/`+` in between,
    until a `<`. Every other character leads to `<` or a digit. `eps` smooths every row (nonzero entropy).
    A closing tag without an opening one is plain text to the rollout, so the chain makes calls, errors
    (`1*+2`) and junk in realistic proportions."""
    if len(set(tag)) != len(tag) or not tag:
        raise ValueError(f"tag {tag!r} must be non-empty with distinct characters")
    vocab = tokenizer.get_vocab()
    V = len(tokenizer)
    digits = [vocab[d] for d in "0123456789"]
    T = torch.zeros(V, V, dtype=torch.float64)

    def put(a: str | int, dist: dict) -> None:
        row = vocab[a] if isinstance(a, str) else a
        T[row] = 0.0
        for b, pb in dist.items():
            if isinstance(b, tuple):  # spread over several tokens
                for t in b:
                    T[row, t] += pb / len(b)
            else:
                T[row, vocab[b] if isinstance(b, str) else b] += pb

    for a in range(V):
        put(a, {"<": 0.7, tuple(digits): 0.3})
    put("<", {tag[0]: p_open, "/": 1 - p_open})
    put("/", {tag[0]: 1.0})
    for x, y in zip(tag, tag[1:] + ">"):
        put(x, {y: 1.0})
    put(">", {tuple(digits): 1 - 0.3 - p_eos, "<": 0.3, tokenizer.eos_token_id: p_eos})
    for d in digits:
        put(d, {tuple(digits): 0.6, "*": 0.1, "+": 0.1, "<": 0.2})
    for op in "*+":
        put(op, {tuple(digits): 1.0})
    T = T + eps
    return (T / T.sum(-1, keepdim=True)).log().float()


def tool_chain_policy(tag: str = "python", seed: int = 0, chain_kw: dict | None = None, **model_kw):
    """(model, tokenizer): the embedded task's tokenizer and a Qwen2 model speaking `tool_chain_log_probs`.

    Model shape defaults to the embedded model's (hidden 128, 4 layers, 4 heads, 2 KV heads, MLP 384)."""
    from arpo.data import load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    return bigram_qwen2(tool_chain_log_probs(tok, tag, **(chain_kw or {})), seed=seed, **model_kw), tok
