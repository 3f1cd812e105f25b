"""Turns one scheduled step into tensors, runs the model on the paged cache, and samples.

One forward per step over every chunk (decodes and prefill chunks packed end to end); logits are computed only
for the rows that sample; one device→host copy per step brings back the sampled tokens and their statistics —
no per-token syncs.
"""
from __future__ import annotations

import torch

from arpo.engine.compiled_decode import CompiledDecode
from arpo.engine.cuda_graph import DecodeGraphs
from arpo.engine.decode_batch import DecodeBatch
from arpo.engine.scheduler import ScheduledChunk
from arpo.model.context import AttentionContext
from arpo_kernels.kv_cache import copy_blocks
from arpo_kernels.sampler import sample


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None,
                 decode_graphs: str = "off", max_batch: int = 256, max_model_len: int = 4096):
        """decode_graphs: "cuda" (capture and replay CUDA graphs), "eager" (same padded path, no capture: tests),
        "compile" (torch.compile'd decode steps, for the CPU) or "off"."""
        if decode_graphs not in ("cuda", "eager", "compile", "off"):
            raise ValueError(f"decode_graphs={decode_graphs!r}: expected 'cuda', 'eager', 'compile' or 'off'")
        self.model = model
        self.device = model.device
        self.block_size = block_size
        scratch = 1 if decode_graphs == "compile" else 0  # the compiled step's write-nowhere block
        self.kv_caches = model.allocate_kv_cache(num_blocks + scratch, block_size, dtype=kv_dtype,
                                                 device=self.device)
        self._flat_caches = [c for pair in self.kv_caches for c in pair]
        self.graphs = None  # the padded decode path: CUDA graphs (or their eager twin) or the compiled CPU step
        if decode_graphs == "compile":
            self.graphs = CompiledDecode(model, self.kv_caches, block_size, scratch_block=num_blocks)
        elif decode_graphs != "off":
            self.graphs = DecodeGraphs(model, self.kv_caches, max_batch, -(-max_model_len // block_size),
                                       block_size, capture=decode_graphs == "cuda")

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([a for a, _ in copies], dtype=torch.int64, device=self.device)
            dst = torch.tensor([b for _, b in copies], dtype=torch.int64, device=self.device)
            copy_blocks(self._flat_caches, src, dst)

    def _context(self, chunks: list[ScheduledChunk], tables: list[list[int]]):
        dev = self.device
        is_decode = all(c.num_tokens == 1 for c in chunks)
        max_blocks = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32, device=dev)
        ctx_lens = [c.start + c.num_tokens for c in chunks]
        slots = torch.tensor([s for c in chunks for s in c.slots], dtype=torch.int64, device=dev)
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + c.num_tokens)
        return AttentionContext.paged(
            self.kv_caches, slots, table, torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=None if is_decode else torch.tensor(cu, dtype=torch.int32, device=dev),
            is_decode=is_decode, max_seqlen_q=max(c.num_tokens for c in chunks), max_context_len=max(ctx_lens),
        ), cu

    def run(self, chunks: list[ScheduledChunk], tables: list[list[int]]):
        """Forward every chunk; returns (sampling chunks, tokens, logprobs, entropies) as host lists."""
        return self.launch(chunks, tables).result()

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], tables: list[list[int]]) -> "LaunchedStep":
        """Queue the step's forward and sampling on the device and return without waiting for them (on CUDA the
        host is free until `result()`; on the CPU the work is done by the time this returns)."""
        padded = self.graphs is not None and all(c.num_tokens == 1 for c in chunks) \
            and self.graphs.fits(len(chunks), max(len(t) for t in tables))
        if padded:
            return self._launch_padded(chunks, tables)
        dev = self.device
        ids = torch.tensor([t for c in chunks for t in c.seq.token_ids[c.start:c.start + c.num_tokens]],
                           dtype=torch.int64, device=dev)
        pos = torch.tensor([p for c in chunks for p in range(c.start, c.start + c.num_tokens)],
                           dtype=torch.int64, device=dev)
        ctx, cu = self._context(chunks, tables)
        hidden = self.model(ids, pos, ctx)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return LaunchedStep([], None)
        rows = torch.tensor([cu[i + 1] - 1 for i in sampling], dtype=torch.int64, device=dev)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        seqs = [chunks[i].seq for i in sampling]
        return LaunchedStep([chunks[i] for i in sampling], self._sample_eager(logits, seqs))

    def _sample_eager(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """Sample one token per row of `logits` for `seqs`; [3, n] fp64 (tokens, log-probs, entropies)."""
        dev = self.device
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev)
        offsets = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int64, device=dev)
        has_filter = any(_filters(p) for p in params)
        tokens, logprobs, entropies = sample(logits, temperature, top_p, top_k, seeds, offsets,
                                             has_filter=has_filter)
        return torch.stack([tokens.double(), logprobs.double(), entropies.double()])

    def _launch_padded(self, chunks: list[ScheduledChunk], tables: list[list[int]]) -> "LaunchedStep":
        """A decode step on the padded path: replayed from a CUDA graph (forward, logits and unfiltered sampling
        together) or the compiled CPU step (forward and logits; sampled here)."""
        seqs = [c.seq for c in chunks]
        logits, sampled = self.graphs.run(DecodeBatch.of(chunks, tables))
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if len(sampling) < len(chunks):
            logits, seqs = logits[sampling], [seqs[i] for i in sampling]
            sampled = None if sampled is None else sampled[:, sampling]
        if sampled is None or any(_filters(s.params) for s in seqs):  # top-k/top-p rows: sample eagerly
            sampled = self._sample_eager(logits, seqs)
        return LaunchedStep([chunks[i] for i in sampling], sampled)


class LaunchedStep:
    """A step whose sampled tokens may still be in flight on the device; `result()` is the step's one sync."""

    def __init__(self, chunks: list[ScheduledChunk], sampled: torch.Tensor | None):
        self.chunks, self.sampled = chunks, sampled  # the sampling chunks; [3, n] fp64 on the device, or None

    def result(self):
        """(sampling chunks, tokens, logprobs, entropies) as host lists, waiting for the device."""
        if self.sampled is None:
            return [], [], [], []
        host = self.sampled.cpu()
        return self.chunks, host[0].long().tolist(), host[1].tolist(), host[2].tolist()


def _filters(p) -> bool:
    return p.temperature > 0 and (p.top_p < 1 or p.top_k > 0)
