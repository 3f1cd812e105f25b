"""Decode steps compiled with torch.compile, for the CPU.

Why: on a CPU a decode step of a small model is a few hundred small ops (norms, rotary, residuals, the paged
gather), each paying PyTorch's per-op dispatch; for a 10M-parameter model that is as much time as its matmuls.
Inductor fuses the elementwise work into a few C++ loops and keeps the matmuls and SDPA as library calls. (On a
GPU the engine replays CUDA graphs instead: `cuda_graph.py`.)

One graph serves every step: batch size and block-table width are dynamic, and both are padded to at least 2 so
that PyTorch's specialisation of sizes 0 and 1 never forces a second compile. Padding rows and re-fed tokens (slot
-1: their K/V is already cached) write their K/V to a scratch block past the ones the block manager hands out.
The graph reads the model's parameters in place: a trainer's optimizer updates are seen by the next step.
The first step pays the compile (tens of seconds; cached on disk by Inductor for later processes).
"""
from __future__ import annotations

import torch
import torch.fx.experimental._config  # noqa: F401 - the duck-shape switch

from arpo.engine.decode_batch import DecodeBatch
from arpo.model.context import AttentionContext


class CompiledDecode:
    def __init__(self, model, kv_caches, block_size: int, scratch_block: int):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.scratch_slot = scratch_block * block_size
        self._fn = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def fits(self, batch: int, widest_table: int) -> bool:
        return True  # dynamic shapes: any batch, any table width

    def _forward(self, ids, pos, slots, tables, lens):
        ctx = AttentionContext.paged(self.kv_caches, slots, tables, lens, is_decode=True, compiled=True)
        return self.model(ids, pos, ctx)

    def run(self, batch: DecodeBatch) -> tuple[torch.Tensor, None]:
        """(logits [n, V], None) of one decode step for n sequences: the caller samples (eagerly)."""
        ids, pos, slots, tables, lens = batch.ids, batch.pos, batch.slots, batch.tables, batch.lens
        n = len(ids)
        pad = max(0, 2 - n)
        width = max(2, max(len(t) for t in tables))
        dev = self.model.device
        ids_t = torch.tensor(ids + [0] * pad, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(pos + [0] * pad, dtype=torch.int64, device=dev)
        slots_t = torch.tensor([s if s >= 0 else self.scratch_slot for s in slots] + [self.scratch_slot] * pad,
                               dtype=torch.int64, device=dev)
        tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad,
                                dtype=torch.int32, device=dev)
        lens_t = torch.tensor(lens + [1] * pad, dtype=torch.int32, device=dev)
        cfg = self.model.config
        AttentionContext.paged(self.kv_caches, slots_t, tables_t, lens_t, is_decode=True).check(
            n + pad, len(self.kv_caches), self.model.dtype, (cfg.num_key_value_heads, cfg.head_dim))
        # no duck sizing: a batch that happens to equal the block size or the table width must not tie the two
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            hidden = self._fn(ids_t, pos_t, slots_t, tables_t, lens_t)[:n]
        return self.model.compute_logits(hidden), None
