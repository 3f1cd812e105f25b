"""The host inputs of one padded decode step, shared by both decode backends.

`DecodeGraphs` (CUDA graphs, `cuda_graph.py`) and `CompiledDecode` (torch.compile on the CPU,
`compiled_decode.py`) take the same `DecodeBatch` and answer the same way — `(logits [n, V], sampled)`, where
`sampled` is the unfiltered sampler's [3, n] fp64 (tokens, log-probs, entropies) when the backend samples inside
its graph, else None — so `ModelRunner` drives either without knowing which it has.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeBatch:
    ids: list[int]                 # the token fed per sequence
    pos: list[int]                 # its position
    slots: list[int]               # its cache slot (-1: its K/V is already cached)
    tables: list[list[int]]        # each sequence's block table
    lens: list[int]                # context length including the fed token
    temperature: list[float]
    seeds: list[int]
    offsets: list[int]             # the sampler's counter: the sequence's length

    @classmethod
    def of(cls, chunks, tables: list[list[int]]) -> "DecodeBatch":
        """From scheduled one-token chunks (`ScheduledChunk`) and their block tables."""
        seqs = [c.seq for c in chunks]
        return cls([s.token_ids[c.start] for s, c in zip(seqs, chunks)], [c.start for c in chunks],
                   [c.slots[0] for c in chunks], tables, [c.start + 1 for c in chunks],
                   [s.params.temperature for s in seqs], [s.seed for s in seqs], [s.num_tokens for s in seqs])

    def __len__(self) -> int:
        return len(self.ids)
