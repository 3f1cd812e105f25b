"""Decode steps replayed from captured CUDA graphs: forward, lm_head and sampling in one replay.

Why: one decode step of a small model launches hundreds of kernels (a few per layer); launched eagerly from
Python that costs more than the GPU work itself. A CUDA graph captured once per padded batch size replays the
whole step with one launch. Inputs live in static device buffers, filled from pinned host buffers by a few
asynchronous copies (no sync before the replay); the step's sampled tokens, log-probs and entropies come back in
one copy. Rows past the real batch are padding whose K/V slot is -1 (written nowhere) and whose context is one
token, so they never touch a live block.

The captured sampler is the unfiltered one (greedy, or temperature sampling over the full vocabulary: ARPO's
default). A step where some row asks for top-k/top-p re-samples eagerly from the graph's logits.

The graph reads the model's parameter tensors by address: a trainer that updates them in place (the optimizer
does) is seen by the next replay, so decoding still runs on the current weights without a copy.
`capture=False` runs the same padded path eagerly (used by the CPU tests of the padding logic).
"""
from __future__ import annotations

import torch

from arpo.engine.decode_batch import DecodeBatch
from arpo.model.context import AttentionContext
from arpo_kernels.sampler import sample

# rows of the int64 staging buffer
_IDS, _POS, _SLOTS, _SEEDS, _OFFSETS, _LENS = range(6)


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
        pin = dev.type == "cuda"
        # host staging (pinned: the copies to the device are asynchronous) and the static device inputs
        self.host_i64 = torch.zeros(6, max_batch, dtype=torch.int64, pin_memory=pin)
        self.host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, pin_memory=pin)
        self.host_temp = torch.zeros(max_batch, dtype=torch.float32, pin_memory=pin)
        self.i64 = torch.zeros(6, max_batch, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self.no_top_p = torch.ones(max_batch, dtype=torch.float32, device=dev)
        self.no_top_k = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self._staged = torch.cuda.Event() if pin else None  # the last copies out of the host buffers
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bs -> (logits, sampled [3, bs] fp64)
        self.pool = None

    def fits(self, batch: int, widest_table: int) -> bool:
        return batch <= self.max_batch and widest_table <= self.max_blocks

    def _step(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = AttentionContext.paged(self.kv_caches, self.i64[_SLOTS, :bs], self.tables[:bs], self.lens[:bs],
                                     is_decode=True, max_seqlen_q=1,
                                     max_context_len=self.max_blocks * self.block_size)
        hidden = self.model(self.i64[_IDS, :bs], self.i64[_POS, :bs], ctx)
        logits = self.model.compute_logits(hidden)
        tokens, logprobs, entropies = sample(logits, self.temperature[:bs], self.no_top_p[:bs], self.no_top_k[:bs],
                                             self.i64[_SEEDS, :bs], self.i64[_OFFSETS, :bs], has_filter=False)
        return logits, torch.stack([tokens.double(), logprobs.double(), entropies.double()])

    def _capture(self, bs: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels and settles the allocator outside the graph
            for _ in range(2):
                self._step(bs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bs] = self._step(bs)
        self.pool = graph.pool()
        self.graphs[bs] = graph

    def _stage(self, bs: int, ids, pos, slots, tables, lens, temperature, seeds, offsets) -> None:
        n = len(ids)
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copies have left the host buffers (normally long done)
        host = self.host_i64.numpy()
        for row, values, fill in ((_IDS, ids, 0), (_POS, pos, 0), (_SLOTS, slots, -1), (_SEEDS, seeds, 0),
                                  (_OFFSETS, offsets, 0), (_LENS, lens, 1)):
            host[row, :n] = values
            host[row, n:bs] = fill
        # padding rows get an all-zero table; entries past the widest row are stale but never read (a context
        # only reaches its own blocks)
        table_rows = self.host_tables.numpy()
        width = max(len(t) for t in tables)
        table_rows[:bs, :width] = 0
        for i, t in enumerate(tables):
            table_rows[i, :len(t)] = t
        temp = self.host_temp.numpy()
        temp[:n] = temperature
        temp[n:bs] = 0.0
        self.i64[:, :bs].copy_(self.host_i64[:, :bs], non_blocking=True)
        self.tables[:bs, :width].copy_(self.host_tables[:bs, :width], non_blocking=True)
        self.lens[:bs].copy_(self.i64[_LENS, :bs])
        self.temperature[:bs].copy_(self.host_temp[:bs], non_blocking=True)
        if self._staged is not None:
            self._staged.record()

    @torch.inference_mode()
    def run(self, batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for n sequences (n <= max_batch): (logits [n, V], sampled [3, n] fp64 on the device:
        tokens, log-probs, entropies of the unfiltered sampler)."""
        n = len(batch)
        bs = next(b for b in self.buckets if b >= n)
        self._stage(bs, batch.ids, batch.pos, batch.slots, batch.tables, batch.lens, batch.temperature,
                    batch.seeds, batch.offsets)
        if not self.capture:
            logits, sampled = self._step(bs)
        else:
            if bs not in self.graphs:
                self._capture(bs)
            self.graphs[bs].replay()
            logits, sampled = self.outputs[bs]
        return logits[:n], sampled[:, :n]
