"""The causal LM that both the trainer and the engine run — one module, one set of parameters.

    model = CausalLM.from_pretrained("ckpt/", dtype=torch.bfloat16, device="cuda")
    hidden = model(input_ids, position_ids, ctx)        # [T] flat tokens → final-normed hidden [T, H]
    logits = model.compute_logits(hidden)               # [T, V] in the model dtype

No batch dimension: sequences are packed end to end and `ctx` (an `AttentionContext`) says how tokens see each
other — packed varlen causal for training, an ancestor mask for tree-packed training, a paged KV cache for the
engine. Logits are a separate call so that the trainer can feed `hidden` and `lm_head_weight` to a fused
loss kernel without materialising [T, V], and the engine only projects the last token of each sequence.
The engine decodes with the very parameter tensors the optimiser updates: no weight copy, no sync.

One parametrised definition covers Qwen2 / Qwen2.5, Qwen3 dense and Llama 3.x: they are the same pre-norm block
and differ only in which projections carry a bias, whether q and k get a per-head RMSNorm (Qwen3), and the RoPE
table (config.py reads which from config.json; rope.py holds the scaling math). `Qwen2Model` is the old name of
this class, kept as an alias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from arpo_kernels.fused_ops import add_rms_norm, rms_norm

from .attention import Attention
from .config import ModelConfig
from .context import AttentionContext
from .layers import RMSNorm, RotaryEmbedding, SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, layer_idx,
            qkv_bias=cfg.qkv_bias, o_proj_bias=cfg.o_proj_bias, qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps,
        )
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_inference(self, x, residual, cos, sin, ctx: AttentionContext):
        """The same layer with autograd off, on fused kernels: `x` is the previous layer's MLP output (or the
        embeddings, with `residual=None`), whose residual add is fused into this layer's first norm.
        Returns (MLP output, residual stream) — the same numbers as `forward`, in fewer launches."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual, h = x, rms_norm(x, norm1.weight, norm1.eps)
        else:
            h, residual = add_rms_norm(x, residual, norm1.weight, norm1.eps)
        h, residual = add_rms_norm(self.self_attn(h, cos, sin, ctx), residual, norm2.weight, norm2.eps)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward (training memory)

    # ---- weights -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None) -> "CausalLM":
        """Load a Hugging Face checkpoint directory. `dtype=None` → the config's dtype (else float32)."""
        from .loading import load_model

        return load_model(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str, max_shard_size: int | None = None) -> None:
        """config.json + safetensors that transformers' class for the model type (Qwen2ForCausalLM, ...) loads
        (sharded above `max_shard_size` bytes, with model.safetensors.index.json)."""
        from .loading import save_model

        save_model(self, path, max_shard_size=max_shard_size)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; the embedding matrix itself when the embeddings are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx: AttentionContext | None = None
    ) -> torch.Tensor:
        """input_ids, position_ids [T] → final-normed hidden states [T, H]. `ctx=None`: one causal sequence."""
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and position_ids must both be flat [T], got {tuple(input_ids.shape)} "
                f"and {tuple(position_ids.shape)}"
            )
        if ctx is None:
            ctx = AttentionContext.single(input_ids.shape[0], input_ids.device)
        if not ctx.compiled:  # a compiled step's caller checks the batch outside the graph
            cfg = self.config
            ctx.check(input_ids.shape[0], len(self.layers), self.dtype, (cfg.num_key_value_heads, cfg.head_dim))
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        if not torch.is_grad_enabled():  # decoding, log-prob scoring: fused kernels, the same numbers
            residual = None
            for layer in self.layers:
                x, residual = layer.forward_inference(x, residual, cos, sin, ctx)
            if residual is None:  # no layers
                return rms_norm(x, self.norm.weight, self.norm.eps)
            return add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] → logits [..., V] (model dtype)."""
        return F.linear(hidden, self.lm_head_weight)

    # ---- paged cache ---------------------------------------------------------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, device=None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        cfg = self.config
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        device = device or self.device
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Bytes one block takes across all layers (K and V): for sizing the cache from free memory."""
        cfg = self.config
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


Qwen2Model = CausalLM  # the name before Qwen3 and Llama joined
