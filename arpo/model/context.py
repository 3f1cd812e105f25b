"""Attention metadata for one forward pass, passed once instead of threaded through every layer.

The kinds, one per caller:

* `varlen`  — the trainer's packed sequences: tokens of B sequences laid end to end, `cu_seqlens` [B+1] int32
  their boundaries; each token attends causally within its own sequence.
* `mask`    — tree-packed training: a bool `attn_mask` [T, T], True where query i may attend key j (j is an
  ancestor-or-self of i). Positions are then tree depths, given by the caller as `position_ids`.
* `blocks`  — the same tree attention, block-sparse: one block per tree node, its rows `q_rows` [N, S] attending
  to its path's rows `kv_rows` [N, P] under `allowed` [N, S, P] (rows padded with -1; see
  `arpo.algo.PackedBatch.node_blocks`). Costs sum(node length x path length) instead of T².
* `paged`   — the engine: per-layer K/V caches `[num_blocks, block_size, num_kv_heads, head_dim]`, where each
  new token's K/V goes (`slot_mapping` [T]), each sequence's blocks (`block_tables` [B, max_blocks] int32), its
  length including the new tokens (`context_lens` [B] int32), and the new tokens' boundaries
  (`cu_seqlens_q` [B+1] int32). `is_decode` means one new token per sequence (T == B). The optional host ints
  `max_seqlen_q` / `max_context_len` let the kernels size their launch grids without a device sync.
  `compiled=True` marks a decode step traced by torch.compile on the CPU: its caller validated the batch, every
  slot is >= 0 (padding rows write to a scratch slot) and attention takes the plain, shape-static path.

Four kinds, each its own small frozen type, so that a context cannot hold another kind's fields:
`VarlenContext`, `MaskContext`, `BlockContext`, `PagedContext`. Build one with `AttentionContext.varlen(...)`,
`.single(...)`, `.tree(...)`, `.tree_blocks(...)` or `.paged(...)` (which check their inputs); the layers dispatch
on `ctx.kind`. `ctx=None` in the model's forward means a single causal sequence. Derived tensors (the
padded-layout index of the SDPA fallback) are computed at the first layer and reused by the others through
`cache` (the one mutable part, per forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch

KINDS = ("varlen", "mask", "blocks", "paged")


class _Context:
    kind: ClassVar[str]
    compiled: ClassVar[bool] = False  # only a paged decode step can be traced by torch.compile

    def check(self, num_tokens: int, num_layers: int, dtype: torch.dtype | None = None,
              kv_shape: tuple[int, int] | None = None) -> None:
        """Checks raised before any layer runs (no device sync on a GPU); nothing to check by default."""


@dataclass(frozen=True)
class VarlenContext(_Context):
    """Packed causal sequences: `cu_seqlens` [B+1] int32 boundaries, `max_seqlen` the longest (host int)."""
    kind: ClassVar[str] = "varlen"
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class MaskContext(_Context):
    """Tree attention under a dense bool mask [T, T] (the test reference of the block-sparse kinds)."""
    kind: ClassVar[str] = "mask"
    attn_mask: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def check(self, num_tokens: int, num_layers: int, dtype=None, kv_shape=None) -> None:
        if self.attn_mask.shape[0] != num_tokens:
            raise ValueError(f"attn_mask is {tuple(self.attn_mask.shape)} but there are {num_tokens} tokens")


@dataclass(frozen=True)
class BlockContext(_Context):
    """Block-sparse tree attention: one block per node, `q_rows` [N, S] attending `kv_rows` [N, P] under
    `allowed` [N, S, P]."""
    kind: ClassVar[str] = "blocks"
    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    allowed: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class PagedContext(_Context):
    """The engine's paged KV cache (see the module docstring for each field)."""
    kind: ClassVar[str] = "paged"
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    is_decode: bool = False
    max_seqlen_q: int | None = None  # host-side bounds the paged kernels use to size their grids sync-free
    max_context_len: int | None = None
    compiled: bool = False  # a CPU decode step traced by torch.compile (see arpo/engine/compiled_decode.py)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def check(self, num_tokens: int, num_layers: int, dtype: torch.dtype | None = None,
              kv_shape: tuple[int, int] | None = None) -> None:
        """With `dtype` (the activations') and `kv_shape` (num_kv_heads, head_dim) given, this is the whole
        validation of a paged batch: the layers then skip their per-call checks."""
        if len(self.kv_caches) != num_layers:
            raise ValueError(f"kv_caches has {len(self.kv_caches)} layers, the model has {num_layers}")
        if self.slot_mapping.shape != (num_tokens,):
            raise ValueError(f"slot_mapping is {tuple(self.slot_mapping.shape)}, expected ({num_tokens},)")
        if self.is_decode and self.context_lens.shape != (num_tokens,):
            raise ValueError("a decode step has one token per sequence: context_lens must be [T]")
        if dtype is not None and kv_shape is not None:
            from arpo_kernels.paged_attention import check_paged_batch

            check_paged_batch(self.kv_caches, self.slot_mapping, self.block_tables, self.context_lens,
                              None if self.is_decode else self.cu_seqlens_q, dtype, *kv_shape)


AnyContext = Union[VarlenContext, MaskContext, BlockContext, PagedContext]


class AttentionContext:
    """The checked constructors of the four context kinds (and the name the model's signatures use)."""

    @staticmethod
    def varlen(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> VarlenContext:
        """`max_seqlen` (a host int) saves a device→host sync per forward when given."""
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return VarlenContext(cu_seqlens, int(max_seqlen))

    @staticmethod
    def single(num_tokens: int, device: torch.device | str) -> VarlenContext:
        cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
        return VarlenContext(cu, num_tokens)

    @staticmethod
    def tree(attn_mask: torch.Tensor) -> MaskContext:
        if attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1] or attn_mask.dtype != torch.bool:
            raise ValueError(
                f"attn_mask must be a square bool [T, T] tensor, got {tuple(attn_mask.shape)} {attn_mask.dtype}"
            )
        return MaskContext(attn_mask)

    @staticmethod
    def tree_blocks(q_rows: torch.Tensor, kv_rows: torch.Tensor, allowed: torch.Tensor) -> BlockContext:
        """Block-sparse tree attention (see the module docstring); padded query rows attend to one dummy key."""
        if q_rows.dim() != 2 or kv_rows.dim() != 2 or allowed.shape != (q_rows.shape[0], q_rows.shape[1],
                                                                         kv_rows.shape[1]):
            raise ValueError(f"tree blocks need q_rows [N, S], kv_rows [N, P], allowed [N, S, P]; got "
                             f"{tuple(q_rows.shape)}, {tuple(kv_rows.shape)}, {tuple(allowed.shape)}")
        allowed = allowed.clone()
        allowed[..., 0] |= q_rows < 0  # keeps padded rows finite (their outputs are dropped)
        return BlockContext(q_rows, kv_rows, allowed)

    @staticmethod
    def paged(
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor | None = None,
        is_decode: bool = False,
        max_seqlen_q: int | None = None,
        max_context_len: int | None = None,
        compiled: bool = False,
    ) -> PagedContext:
        if not is_decode and cu_seqlens_q is None:
            raise ValueError("a paged prefill context needs cu_seqlens_q")
        return PagedContext(kv_caches, slot_mapping, block_tables, context_lens, cu_seqlens_q, is_decode,
                            max_seqlen_q, max_context_len, compiled)


__all__ = ["AttentionContext", "AnyContext", "VarlenContext", "MaskContext", "BlockContext", "PagedContext",
           "KINDS"]
