"""Paged KV cache: decode attention through block tables, and forking a trajectory by sharing blocks.

Workloads:
- `decode`: one query token per sequence over batch x context (GPU: batch 1/16/64 x context 1k/4k, Hq 16,
  Hkv 2, D 128, bf16, block 16; the tables point at shuffled blocks, as after many forks and frees).
  Providers: `contiguous` = SDPA on K/V already laid out contiguously per sequence (the cache layout paging
  gives up), `arpo-paged` = `paged_decode_attention`, `flash-attn-paged` = flash-attn's `flash_attn_with_kvcache`
  with a block table (its own cache with 256-token pages, the smallest it accepts). Decode is bandwidth-bound;
  `bytes_read` (K/V bytes per call) gives the GB/s column.
- `fork`: 16 children of a ~2k-token parent over all layers (GPU: 28 layers, Hkv 2, D 128, bf16, Qwen2.5-1.5B's
  cache shape). `contiguous` copies the parent's K/V once per child; `arpo-paged` writes 16 block-table rows that
  share the parent's blocks and copies only the shared partial last block once per child (copy_blocks, one
  launch). `tree_kv_mb_*` in extra count the KV memory each scheme holds for the 17-sequence tree.

    arpo bench paged-attention [--device cuda] [--quick]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DOC = "paged decode attention vs SDPA on contiguous K/V (and flash-attn); fork 16 children: block sharing vs copies"
BASELINE = "contiguous"


@dataclass
class Case:
    kind: str  # "decode" | "fork"
    batch: int  # decode: sequences; fork: children
    context: int  # decode: tokens per sequence; fork: parent tokens
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: str
    layers: int = 1

    @property
    def label(self) -> str:
        dt = str(self.dtype).split(".")[-1]
        if self.kind == "fork":
            return f"fork {self.batch}x parent={self.context} L={self.layers} {dt}"
        return f"decode B={self.batch} ctx={self.context} Hq={self.q_heads}/{self.kv_heads} D={self.head_dim} {dt}"

    def token_bytes(self) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def extra(self) -> dict:
        extra = {"kind": self.kind, "batch": self.batch, "context": self.context, "q_heads": self.q_heads,
                 "kv_heads": self.kv_heads, "head_dim": self.head_dim, "block_size": self.block_size,
                 "dtype": str(self.dtype), "layers": self.layers}
        if self.kind == "decode":
            extra["bytes_read"] = self.batch * self.context * self.token_bytes()
        else:
            per_token = self.token_bytes() * self.layers / 2**20
            shared_blocks = math.ceil(self.context / self.block_size) + self.batch  # + one CoW block per child
            extra["tree_kv_mb_contiguous"] = round((self.batch + 1) * self.context * per_token, 2)
            extra["tree_kv_mb_paged"] = round(shared_blocks * self.block_size * per_token, 2)
        return extra


def cases(device: str, quick: bool) -> list[Case]:
    if device.startswith("cuda"):
        shape = dict(q_heads=16, kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16, device=device)
        grid = [(1, 1024), (64, 4096)] if quick else [(b, c) for b in (1, 16, 64) for c in (1024, 4096)]
        fork = Case("fork", 16, 2050, layers=28, **shape)
    else:
        shape = dict(q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, device=device)
        grid = [(1, 256), (8, 512)] if quick else [(1, 1024), (8, 1024), (16, 2048)]
        fork = Case("fork", 16, 2050, layers=2 if quick else 8, **shape)
    return [Case("decode", b, c, **shape) for b, c in grid] + [fork]


def _decode_inputs(case: Case, block_size: int):
    """Per-sequence contiguous K/V, the same tokens scattered into a shuffled block pool, and queries."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b, n, hkv, d = case.batch, case.context, case.kv_heads, case.head_dim
    per_seq = math.ceil(n / block_size)
    pool = b * per_seq
    tables = torch.randperm(pool, generator=g).view(b, per_seq).int().to(case.device)
    k_cache = torch.randn(pool, block_size, hkv, d, generator=g).to(case.device, case.dtype)
    v_cache = torch.randn(pool, block_size, hkv, d, generator=g).to(case.device, case.dtype)
    q = torch.randn(b, case.q_heads, d, generator=g).to(case.device, case.dtype)
    lens = torch.full((b,), n, dtype=torch.int32, device=case.device)
    return q, k_cache, v_cache, tables, lens


def _contiguous_decode(case: Case):
    if case.kind != "decode":
        return None
    q, k_cache, v_cache, tables, lens = _decode_inputs(case, case.block_size)
    pos = torch.arange(case.context, device=case.device)
    slots = tables.long()[:, pos // case.block_size] * case.block_size + pos % case.block_size  # [B, n]
    k = k_cache.view(-1, case.kv_heads, case.head_dim)[slots].transpose(1, 2).contiguous()  # [B, Hkv, n, D]
    v = v_cache.view(-1, case.kv_heads, case.head_dim)[slots].transpose(1, 2).contiguous()
    del k_cache, v_cache
    q4 = q[:, :, None]  # [B, Hq, 1, D]

    def run():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    return run


def _arpo_decode(case: Case):
    if case.kind != "decode":
        return None
    from arpo_kernels.paged_attention import paged_decode_attention

    q, k_cache, v_cache, tables, lens = _decode_inputs(case, case.block_size)

    def run():
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, max_context_len=case.context)
    return run


def _flash_attn_decode(case: Case):
    if case.kind != "decode" or not case.device.startswith("cuda"):
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    q, k_cache, v_cache, tables, lens = _decode_inputs(case, 256)
    q4 = q[:, None]  # [B, 1, Hq, D]

    def run():
        return flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=lens, block_table=tables, causal=True)
    return run


def _fork_parent(case: Case, spare_blocks: int):
    """Every layer's K and V pool holding the parent's tokens in blocks 0..n-1, plus `spare_blocks` free ones."""
    parent_blocks = math.ceil(case.context / case.block_size)
    shape = (parent_blocks + spare_blocks, case.block_size, case.kv_heads, case.head_dim)
    caches = [torch.randn(shape, device=case.device).to(case.dtype) for _ in range(2 * case.layers)]
    table = torch.arange(parent_blocks, dtype=torch.int32, device=case.device)
    return caches, table


def _contiguous_fork(case: Case):
    if case.kind != "fork":
        return None
    caches, _ = _fork_parent(case, 0)
    parent = [c.view(-1, case.kv_heads, case.head_dim)[:case.context] for c in caches]  # contiguous already

    def run():  # each child owns a full copy of the parent's K/V in every layer
        return [[x.clone() for x in parent] for _ in range(case.batch)]
    return run


def _paged_fork(case: Case):
    if case.kind != "fork":
        return None
    from arpo_kernels.kv_cache import copy_blocks

    caches, table = _fork_parent(case, case.batch)
    parent_blocks = table.numel()
    partial = case.context % case.block_size != 0
    free = torch.arange(parent_blocks, parent_blocks + case.batch, dtype=torch.int32, device=case.device)
    last = table[-1:].repeat(case.batch)

    def run():  # children share the parent's blocks; the shared partial last block is copied once per child
        children = table.expand(case.batch, -1).clone()
        if partial:
            children[:, -1] = free
            copy_blocks(caches, last, free)
        return children
    return run


def providers(device: str) -> dict:
    return {
        "contiguous": lambda case: _contiguous_decode(case) if case.kind == "decode" else _contiguous_fork(case),
        "arpo-paged": lambda case: _arpo_decode(case) if case.kind == "decode" else _paged_fork(case),
        "flash-attn-paged": _flash_attn_decode,
    }
