"""Chooses what each engine step computes: decodes first, then prefill chunks, within a token budget.

Continuous batching: every RUNNING sequence with one pending token (a decode) is fed each step; sequences with
more pending tokens (new prompts, tool results appended by `extend`, preempted sequences being recomputed) get
chunks of the remaining token budget, oldest first. Cache blocks are taken from the block manager at this point;
when they run out the newest running sequence is preempted (its blocks freed, its tokens kept) and recomputed
later, so nothing is ever half-written. A sequence that cannot fit even alone is an error, not a hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from arpo.engine.sequence import Sequence, SequenceStatus


class CacheTooSmallError(RuntimeError):
    """The KV cache cannot hold one sequence even with every other sequence preempted."""


@dataclass
class SchedulePlan:
    """What one `schedule()` decided: the chunks to feed, the copy-on-write block copies to perform before the
    forward, and the sequences it preempted (their blocks freed, to be recomputed later)."""
    chunks: list["ScheduledChunk"] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


@dataclass(eq=False)
class ScheduledChunk:
    seq: Sequence
    start: int                 # first position fed
    num_tokens: int            # tokens fed this step
    slots: list[int]           # cache slot per fed token (-1: its K/V is already cached)
    samples: bool              # the chunk reaches the end of the known tokens: sample the next one


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

    # --- cache bookkeeping for one sequence ------------------------------------------------------------------
    def _slots_for(self, plan: SchedulePlan, seq: Sequence, start: int, n: int) -> list[int]:
        """Cache slots for positions [start, start+n), reserving new ones past what the cache already holds."""
        have = self.bm.num_tokens(seq.seq_id) if self.bm.has(seq.seq_id) else 0
        end = start + n
        if not self.bm.has(seq.seq_id):
            cached = self.bm.allocate(seq.seq_id, seq.token_ids[:end])
            seq.num_computed = min(max(seq.num_computed, cached), end - 1)
            start = seq.num_computed
            have = end
            table = self.bm.block_table(seq.seq_id)
            bs = self.bm.block_size
            return [-1 if p < cached else table[p // bs] * bs + p % bs for p in range(start, end)]
        slots = [-1] * max(0, min(have, end) - start)
        if end > have:
            new_slots, copies = self.bm.append(seq.seq_id, end - have, seq.token_ids[have:end])
            plan.copies.extend(copies)
            slots.extend(new_slots)
        return slots

    def _fits(self, seq: Sequence, end: int) -> bool:
        if not self.bm.has(seq.seq_id):
            return self.bm.can_allocate(end)
        have = self.bm.num_tokens(seq.seq_id)
        return end <= have or self.bm.can_append(seq.seq_id, end - have)

    def _preempt(self, plan: SchedulePlan, victim: Sequence, running: list[Sequence]) -> None:
        self.bm.free(victim.seq_id)
        victim.num_computed = 0
        victim.status = SequenceStatus.WAITING
        running.remove(victim)
        plan.preempted.append(victim)

    # --- one step --------------------------------------------------------------------------------------------
    def schedule(self, active: list[Sequence]) -> SchedulePlan:
        """Pick chunks for this step from the active (non-stopped) sequences.

        Order: decodes, then running sequences with several pending tokens, then waiting ones, each oldest first.
        Only sequences not yet given a chunk this step are preempted, newest first, so no block reserved in this
        step is ever freed before its K/V is written. Waiting sequences never preempt running ones.
        """
        plan = SchedulePlan()
        order = sorted(active, key=lambda s: s.arrival)
        if self._all_decodes(plan, order):
            return plan
        running = [s for s in order if s.status == SequenceStatus.RUNNING]
        queue = ([s for s in running if s.num_pending == 1] + [s for s in running if s.num_pending > 1]
                 + [s for s in order if s.status == SequenceStatus.WAITING])
        chunks = plan.chunks
        chosen: set[int] = set()
        budget = self.max_num_batched_tokens
        for seq in queue:
            if len(chunks) >= self.max_num_seqs or budget < 1:
                break
            if seq in plan.preempted or seq.num_pending < 1:
                continue
            n = min(seq.num_pending, budget)
            end = seq.num_computed + n
            if not self._make_room(plan, seq, end, running, chosen):
                if not chunks and not self._others_hold_blocks(seq):
                    raise CacheTooSmallError(self.too_small(seq, end))
                continue
            slots = self._slots_for(plan, seq, seq.num_computed, n)
            start = seq.num_computed  # a prefix-cache hit may have advanced it
            seq.status = SequenceStatus.RUNNING
            if seq not in running:
                running.append(seq)
            chunks.append(ScheduledChunk(seq, start, end - start, slots, end == seq.num_tokens))
            chosen.add(seq.seq_id)
            budget -= end - start
        return plan

    def all_decodes(self, active: list[Sequence]) -> bool:
        """Would `schedule(active)` be the steady state of `_all_decodes` (every sequence one decode, no
        preemption possible)? Changes nothing."""
        bm = self.bm
        n = len(active)
        if n > self.max_num_seqs or n > self.max_num_batched_tokens or bm.num_free_blocks < n:
            return False
        return all(seq.status == SequenceStatus.RUNNING and seq.num_pending == 1 and bm.has(seq.seq_id)
                   for seq in active)

    def _all_decodes(self, plan: SchedulePlan, order: list[Sequence]) -> bool:
        """The steady state, scheduled without the general loop's bookkeeping: every active sequence is a running
        decode (one pending token, blocks held) and there are free blocks for one new block each (the most one
        token can need, a copy-on-write included), so no preemption can happen. The same chunks, in the same order,
        as the general loop, put in `plan`; False (and `plan` untouched) when the step is anything else."""
        if not self.all_decodes(order):
            return False
        bm = self.bm
        for seq in order:
            start = seq.num_computed
            if bm.num_tokens(seq.seq_id) > start:  # its K/V is already cached (a fork's re-fed last token)
                slots = [-1]
            else:
                slots, copies = bm.append(seq.seq_id, 1, seq.token_ids[start:start + 1])
                plan.copies.extend(copies)
            plan.chunks.append(ScheduledChunk(seq, start, 1, slots, True))
        return True

    def _make_room(self, plan: SchedulePlan, seq: Sequence, end: int, running: list[Sequence],
                   chosen: set[int]) -> bool:
        while not self._fits(seq, end):
            if seq.status != SequenceStatus.RUNNING:
                return False
            victims = [s for s in running if s is not seq and s.seq_id not in chosen]
            victim = max(victims, key=lambda s: s.arrival) if victims else seq
            self._preempt(plan, victim, running)
            if victim is seq:
                return False
        return True

    def _others_hold_blocks(self, seq: Sequence) -> bool:
        return any(sid != seq.seq_id for sid in self.bm.seq_ids())

    def too_small(self, seq: Sequence, end: int) -> str:
        held = [sid for sid in self.bm.seq_ids() if sid != seq.seq_id]
        hint = f"; {len(held)} stopped sequences still hold blocks: release them" if held else ""
        return (f"the KV cache ({self.bm.num_blocks} blocks of {self.bm.block_size} tokens) cannot hold sequence "
                f"{seq.seq_id} at {end} tokens{hint}; give the engine more blocks or use shorter sequences")
