"""Self-attention (Qwen2 / Qwen3 / Llama) over flat packed tokens, with the backend chosen by the context's kind.

* packed varlen causal: flash-attn's varlen kernel when it imports (probed once here: `HAS_FLASH_ATTN`) and the
  tensors are fp16/bf16 on CUDA; otherwise SDPA on a padded [B, max_seqlen] view with `is_causal=True` — padding
  sits at the end of each row, so causality alone keeps real queries off padded keys and no mask is built.
  The padding costs B*max_seqlen^2 instead of sum(len^2) attention work; a single sequence runs unpadded.
* tree mask: SDPA with the bool [T, T] ancestor mask (the tests' reference); tree blocks: SDPA node by node (the
  CPU trainer); tree intervals: `arpo_kernels.tree_attention`, no mask (the CUDA trainer).
* paged: `arpo_kernels.kv_cache.store_kv` writes this step's K/V into the layer's cache, then
  `arpo_kernels.paged_attention.paged_decode_attention` (one query per sequence) or `paged_prefill_attention`
  (the last q_len tokens of each context, causal) reads the whole context from the cache.

q/k/v live in one fused projection (`qkv_proj`: q rows, then k, then v; with a bias for Qwen2, and where a
Qwen3 / Llama config sets `attention_bias`, which also gives o_proj one). Qwen3's per-head q/k RMSNorm runs
before RoPE; with autograd off it is fused into the rotary kernel (one launch for norm and rotation of q and k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arpo_kernels.fused_ops import rotary_qk, rotary_reference
from arpo_kernels.tree_attention import tree_attention

from .context import AttentionContext
from .layers import RMSNorm

try:  # probed once; never required
    from flash_attn import flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    """q [..., Hq, L, D], k/v [..., Hkv, S, D]; grouped-query heads handled by SDPA."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3], **kw)


def _padded_index(ctx: AttentionContext, num_tokens: int, device: torch.device):
    """Gather index into the padded [B, L] layout and, per token, its (row, column) in it. Sync-free."""
    if "pad" not in ctx.cache:
        cu = ctx.cu_seqlens.to(device=device, dtype=torch.int64)
        lens = cu[1:] - cu[:-1]
        cols = torch.arange(ctx.max_seqlen, device=device)
        valid = cols[None, :] < lens[:, None]
        gather = torch.where(valid, cu[:-1, None] + cols[None, :], 0)
        tokens = torch.arange(num_tokens, device=device)
        row = torch.searchsorted(cu[1:], tokens, right=True)
        ctx.cache["pad"] = (gather, row, tokens - cu[row])
    return ctx.cache["pad"]


def varlen_attention(q, k, v, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] → [T, Hq, D]; causal within each sequence of `ctx.cu_seqlens`."""
    if HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = ctx.cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, ctx.max_seqlen, ctx.max_seqlen, softmax_scale=scale, causal=True
        )
    if ctx.cu_seqlens.shape[0] == 2:  # one sequence: no padding needed
        out = _sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale, is_causal=True)
        return out.transpose(0, 1)
    gather, row, col = _padded_index(ctx, q.shape[0], q.device)
    qp, kp, vp = (x[gather].permute(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D]
    out = _sdpa(qp, kp, vp, scale, is_causal=True).permute(0, 2, 1, 3)  # [B, L, H, D]
    return out[row, col]


def masked_attention(q, k, v, attn_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], attn_mask [T, T] bool (True = may attend) → [T, Hq, D]."""
    # 4-D inputs: with 3-D ones the CPU SDPA falls back to its slow math path.
    out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale,
                attn_mask=attn_mask[None, None])
    return out[0].transpose(0, 1)


def block_attention(q, k, v, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """Tree attention node by node: gather each node's query rows and its path's K/V rows, SDPA, scatter back."""
    q_rows, kv_rows = ctx.q_rows, ctx.kv_rows
    qi, ki = q_rows.clamp(min=0), kv_rows.clamp(min=0)
    out = _sdpa(q[qi].transpose(1, 2), k[ki].transpose(1, 2), v[ki].transpose(1, 2), scale,
                attn_mask=ctx.allowed[:, None])  # [N, Hq, S, D]
    valid = q_rows >= 0
    result = q.new_empty(q.shape)
    return result.index_put((q_rows[valid],), out.transpose(1, 2)[valid])


def paged_attention(q, k, v, ctx: AttentionContext, layer_idx: int, scale: float) -> torch.Tensor:
    """Write this step's K/V into the layer's cache, then attend over each sequence's whole cached context.

    The batch's metadata was checked once (`AttentionContext.check`); on the PyTorch path the index work is planned
    at the first layer and reused by the others (`ctx.cache["plan"]`)."""
    from arpo_kernels._backend import use_triton
    from arpo_kernels.kv_cache import store_kv
    from arpo_kernels.paged_attention import paged_decode_attention, paged_prefill_attention
    from arpo_kernels.paged_attention_cpu import plan_torch

    k_cache, v_cache = ctx.kv_caches[layer_idx]
    if ctx.compiled:
        return _compiled_decode_attention(q, k, v, k_cache, v_cache, ctx, scale)
    store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, validate=False)
    plan = None
    if not use_triton(q):
        if "plan" not in ctx.cache:
            ctx.cache["plan"] = plan_torch(k_cache, ctx.block_tables, ctx.context_lens,
                                           None if ctx.is_decode else ctx.cu_seqlens_q)
        plan = ctx.cache["plan"]
    if ctx.is_decode:
        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                                      max_context_len=ctx.max_context_len, plan=plan)
    return paged_prefill_attention(q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.context_lens, scale,
                                   max_q_len=ctx.max_seqlen_q, plan=plan)


def _compiled_decode_attention(q, k, v, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """The decode step as torch.compile traces it: no data-dependent shapes (every slot is real or scratch),
    the plain gather-and-SDPA attention, its mask built once per forward."""
    from arpo_kernels.paged_attention_cpu import _attend_plain, _plain_part

    h, d = k_cache.shape[2:]
    k_cache.view(-1, h, d).index_copy_(0, ctx.slot_mapping, k)
    v_cache.view(-1, h, d).index_copy_(0, ctx.slot_mapping, v)
    if "plain" not in ctx.cache:
        ctx.cache["plain"] = _plain_part(ctx.block_tables.long(), ctx.context_lens.long(), k_cache.shape[1])
    return _attend_plain(q, k_cache, v_cache, ctx.cache["plain"], k_cache.shape[1], scale)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, *,
                 qkv_bias: bool = True, o_proj_bias: bool = False, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=o_proj_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def _rotate(self, q, k, cos, sin):
        """q/k norm (if any) and RoPE: the eager ops under autograd, one fused launch otherwise (same numbers)."""
        if torch.is_grad_enabled():
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
        if self.q_norm is None:
            return rotary_qk(q, k, cos, sin)
        return rotary_qk(q, k, cos, sin, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim)
        q, k = self._rotate(q, k, cos, sin)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if ctx.kind == "varlen":
            o = varlen_attention(q, k, v, ctx, self.scale)
        elif ctx.kind == "blocks":
            o = block_attention(q, k, v, ctx, self.scale)
        elif ctx.kind == "intervals":
            o = tree_attention(q, k, v, ctx.token_enter, ctx.token_exit, self.scale)
        elif ctx.kind == "mask":
            o = masked_attention(q, k, v, ctx.attn_mask, self.scale)
        else:
            o = paged_attention(q, k, v, ctx, self.layer_idx, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))
