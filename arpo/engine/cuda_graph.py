"""Decode steps replayed from captured CUDA graphs.

Why: one decode step of a small model launches hundreds of kernels (a few per layer); launched eagerly from
Python that costs more than the GPU work itself. A CUDA graph captured once per padded batch size replays the
whole forward with one launch. Inputs live in static buffers; rows past the real batch are padding whose K/V
slot is -1 (written nowhere) and whose context is one token, so they never touch a live block.

The graph reads the model's parameter tensors by address: a trainer that updates them in place (the optimizer
does) is seen by the next replay, so decoding still runs on the current weights without a copy.
`capture=False` runs the same padded path eagerly (used by the CPU tests of the padding logic).
"""
from __future__ import annotations

import torch

from arpo.model.context import AttentionContext


def _buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_blocks: int, block_size: int, capture: bool = True):
        dev = model.device
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.buckets = _buckets(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def fits(self, batch: int, widest_table: int) -> bool:
        return batch <= self.max_batch and widest_table <= self.max_blocks

    def _ctx(self, bs: int) -> AttentionContext:
        return AttentionContext.paged(self.kv_caches, self.slots[:bs], self.tables[:bs], self.lens[:bs],
                                      is_decode=True, max_seqlen_q=1,
                                      max_context_len=self.max_blocks * self.block_size)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.ids[:bs], self.pos[:bs], self._ctx(bs))

    def _capture(self, bs: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels and settles the allocator outside the graph
            for _ in range(2):
                self._forward(bs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bs] = self._forward(bs)
        self.pool = graph.pool()
        self.graphs[bs] = graph

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]],
            lens: list[int]) -> torch.Tensor:
        """Hidden states [n, H] of one decode step for n sequences (n <= max_batch)."""
        n = len(ids)
        bs = next(b for b in self.buckets if b >= n)
        dev = self.ids.device
        width = max(len(t) for t in tables)
        pad = bs - n
        flat = [b for t in tables for b in t + [0] * (width - len(t))] + [0] * (pad * width)
        self.tables[:bs].zero_()
        self.tables[:bs, :width].copy_(torch.tensor(flat, dtype=torch.int32).view(bs, width), non_blocking=True)
        self.ids[:bs].copy_(torch.tensor(ids + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.pos[:bs].copy_(torch.tensor(pos + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.slots[:bs].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64), non_blocking=True)
        self.lens[:bs].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        if not self.capture:
            return self._forward(bs)[:n]
        if bs not in self.graphs:
            self._capture(bs)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
