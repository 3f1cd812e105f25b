"""ARPO's entropy-adaptive tree rollout (../shared/ARPO.md §2) driven on `LLMEngine`, tools on a thread pool.

    rollout = TreeRollout(engine, ToolExecutor(load_tools(["python", "search"])), RolloutConfig(), reward_fn)
    trees = rollout.run(prompts)          # one RolloutTree per prompt, exactly `leaves` leaves each

How it maps onto the engine, per prompt:
1. The prompt is prefilled once, by an *anchor* sequence that samples one throw-away token and then stays
   stopped holding only the prompt's cache. N globals are `fork`ed from it (they re-feed the last prompt token
   for its logits; nothing is prefilled again), and so are fill samples later.
2. A sequence stops at a tool's closing tag (`</python>`) while the batch keeps decoding; the calls of a step go
   to the executor's pool together (a batching tool, a retrieval server, answers them in one request); the first
   step after a call's future is done appends ` <result>…</result>` with `extend`.
   A failing tool gives an error result, a call past the deadline a timeout result: neither stops anything.
3. After the result the sequence samples k probe tokens; `EntropyBrancher` turns them into a decision; a
   positive one forks Z children at the position right after the result (`fork(at=...)`, shared blocks,
   copy-on-write). The probe tokens stay with the parent. A prompt stops branching at M trajectories in
   flight or done; when all have finished with fewer, fresh globals fill the budget (they cannot branch).
4. Call limit: once a trajectory has made `max_tool_calls` calls, the next closing tool tag ends it there with
   finish reason `call_limit` (`over_limit: end`, the reference's EOS: the trajectory is unanswered, reward −1).
   No EOS token is appended — it would not have been sampled, so it has no sampler log-prob to train on; the
   text the reward sees is the same. `over_limit: text`: the tags become plain text instead — generation goes
   on and ends at EOS or the cap, no further call is run and nothing is appended.
   Length cap: sampled + tool-result tokens ≤ `max_response_tokens` (and the engine's max_model_len). A result
   that does not fit ends the trajectory with finish reason `length`, the call text kept, no result appended.
5. `mode="trajectory"`: M independent globals, tools but no probes or branching (the GRPO baseline).

Where this differs from the reference's rollout (`vllm_rollout_with_tools.py`) on purpose:
- H_t is measured on the k tokens sampled right *after* the tool result (the text the result leads to, which
  decides whether branching there pays); the reference scores the first 20 tokens of the segment that ended
  *with* the call, i.e. before the result — at a trajectory's first call that is the very segment its H_init
  came from, so there ΔH = 0 and P = α.
- A child's H_init is its path's first k sampled tokens — its parent's H_init, the same prompt and opening; the
  reference keys H_init by sample index in a dict that is never reset, so a child (a new index) takes the
  entropy of its first own segment, and an index reused in a later step keeps a stale value.
- Fill samples (fresh globals started once every trajectory of a prompt has finished with fewer than M leaves)
  fill the budget at once and cannot branch (the budget is spent); the reference adds one fresh sample per
  generation round, and those may branch later.
- One uniform draw per decision forks all Z children; the reference draws once per extra beam.
- A call with empty content is run like any other (the tool answers it); the reference ends the trajectory
  there, with no result (so −1 under its reward).

Determinism: sampling is counter-based per (seed, position) and every trajectory's seed and bernoulli draw are
hashed from (seed, prompt, trajectory path), so a trajectory's tokens do not depend on batch order or timing.
Only the budget race (who takes the last units of M) depends on when results land: `sync_tools=True` removes it.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from arpo.engine import SamplingParams
from arpo.rollout.branching import EntropyBrancher, derive_seed, dynamic_global_budget, window_entropy
from arpo.rollout.config import RolloutConfig
from arpo.rollout.prompts import as_prompt_inputs
from arpo.rollout.state import Arrays, PromptState, Trajectory, build_tree
from arpo.rollout.tree import RolloutTree
from arpo.tools.base import ToolResult

STAT_KEYS = ("prefill_tokens", "decode_tokens", "refed_tokens", "steps", "preemptions", "block_copies",
             "dropped_steps")


@dataclass
class RolloutResult:
    """What one `TreeRollout.run` produced: a tree per prompt (in order) and the run's counters (tool calls, tool
    wait, decode time, peak KV blocks, wall time, and the engine's prefill/decode/refed tokens, steps,
    preemptions, block copies and decode steps launched ahead then dropped (`engine.decode_overlap`) during the
    run)."""
    trees: list[RolloutTree]
    stats: dict


class TreeRollout:
    """The rollout's fixed parts (engine, tools, settings, reward, brancher); each `run` is independent."""

    def __init__(self, engine, tools=None, config: RolloutConfig | None = None,
                 reward_fn: Callable[..., float] | None = None, tokenizer=None,
                 brancher: EntropyBrancher | None = None):
        self.engine, self.tools = engine, tools
        self.cfg = config or RolloutConfig()
        if self.cfg.mode == "auto":
            raise ValueError("RolloutConfig.mode='auto' must be resolved to 'tree' or 'trajectory' by the caller "
                             "(the run builder resolves it from algo.name)")
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer or engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("TreeRollout needs a tokenizer (for tool calls, results and leaf text)")
        c = self.cfg
        self.brancher = brancher or EntropyBrancher(
            alpha=c.alpha, beta=c.beta, tau=c.tau, rule=c.branch_rule, k=c.probe_tokens,
            vocab_size=engine.model.config.vocab_size, penalty_rate=c.aepo_penalty_rate if c.aepo_branch_penalty
            else 0.0, reduce=c.entropy_reduce)
        self.stop_strings = tuple(tools.stop_strings) if tools is not None else ()

    def run(self, prompts: Iterable, seed: int = 0, seed_indices: Sequence[int] | None = None) -> RolloutResult:
        """Roll out every prompt (ids, Example, dict, text) in one engine batch; one tree per prompt, in order.

        `seed` keys every random draw (give each training step its own). `seed_indices` (default 0, 1, ...): what
        each prompt's random draws are keyed on, with the seed — a data-parallel rank passes the prompts' places
        in the global batch, so that a prompt's tree does not depend on which rank rolls it out."""
        return _Run(self, seed).execute(prompts, seed_indices)


class _Run:
    """The state of one `TreeRollout.run` call: its trajectories, anchors, pending tool calls and counters."""

    def __init__(self, rollout: TreeRollout, seed: int):
        self.engine, self.tools, self.cfg = rollout.engine, rollout.tools, rollout.cfg
        self.reward_fn, self.tokenizer, self.brancher = rollout.reward_fn, rollout.tokenizer, rollout.brancher
        self.stop_strings = rollout.stop_strings
        self.seed = seed
        self._by_seq: dict[int, Trajectory] = {}
        self._anchors: dict[int, PromptState] = {}
        self._pending: dict = {}  # future -> (trajectory, submit time, engine step it was made after)
        self._calls: list = []  # (trajectory, call) made in this step, submitted together after it
        self._step_no = 0
        self._states: list[PromptState] = []
        self.stats = {"tool_calls": 0, "tool_wait_s": 0.0, "decode_s": 0.0, "peak_blocks": 0}

    def execute(self, prompts: Iterable, seed_indices: Sequence[int] | None) -> RolloutResult:
        before = dict(self.engine.stats)
        t_start = time.perf_counter()
        inputs = as_prompt_inputs(prompts, self.tokenizer)
        if seed_indices is not None and len(seed_indices) != len(inputs):
            raise ValueError(f"seed_indices has {len(seed_indices)} entries for {len(inputs)} prompts")
        states = [PromptState(i, inp, -1 if seed_indices is None else int(seed_indices[i]))
                  for i, inp in enumerate(inputs)]
        self._states = states
        for st in states:
            self._start(st)
        while not all(st.done for st in states):
            if self.engine.has_unfinished():
                t0 = time.perf_counter()
                outs = self.engine.step()
                self._step_no += 1
                self.stats["decode_s"] += time.perf_counter() - t0
                bm = self.engine.block_manager
                self.stats["peak_blocks"] = max(self.stats["peak_blocks"], bm.num_blocks - bm.num_free_blocks)
                for out in outs:
                    self._on_token(out)
                self._submit_calls()
                if self.cfg.sync_tools:  # may wait for the calls made before this step
                    t0 = time.perf_counter()
                    self._harvest(block=True, due_only=True)
                    self.stats["tool_wait_s"] += time.perf_counter() - t0
                else:
                    self._harvest(block=False)
            elif self._pending:
                t0 = time.perf_counter()
                self._harvest(block=True)
                self.stats["tool_wait_s"] += time.perf_counter() - t0
            else:
                raise RuntimeError("rollout stalled: no sequence to decode and no tool call pending "
                                   f"(prompts not done: {[st.index for st in states if not st.done]})")
        for k in STAT_KEYS:
            self.stats[k] = self.engine.stats[k] - before.get(k, 0)
        self.stats["wall_s"] = time.perf_counter() - t_start
        meta = {"mode": self.cfg.mode, "prefix_mode": self.cfg.prefix_mode, "seed": self.seed,
                "leaves": self.cfg.leaves}
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return RolloutResult([build_tree(st, decode, self.reward_fn, meta) for st in states], self.stats)

    # --- launching ---------------------------------------------------------------------------------------------
    def _start(self, st: PromptState) -> None:
        c = self.cfg
        if c.mode == "trajectory":
            n = c.leaves
        elif c.aepo_dynamic_budget:
            n, st.presampling = 1, True
        else:
            n = c.initial
        if c.prefix_mode == "fork":
            st.anchor = self.engine.add(st.inp.prompt_ids, SamplingParams(temperature=0, max_tokens=1))
            self._anchors[st.anchor] = st
        self._launch_globals(st, n)

    def _launch_globals(self, st: PromptState, n: int, fill: bool = False) -> None:
        if n <= 0:
            return
        if st.anchor is not None and not st.anchor_ready:
            st.pending_globals += n
            return
        st.count += n
        st.active += n
        P = st.prompt_len
        keys = [f"g{st.num_globals + i}" for i in range(n)]
        seeds = [derive_seed(self.seed, st.seed_index, key) for key in keys]
        params = self._params(0, self._room(st, P))
        if st.anchor is not None:
            ids = self.engine.fork(st.anchor, n, at=P, seeds=seeds, params=params)
        else:
            ids = [self.engine.add(st.inp.prompt_ids, replace(params, seed=s)) for s in seeds]
        for key, sid in zip(keys, ids):
            self._register(st, Trajectory(key, st.index, sid, P, P, Arrays(), fill=fill))

    def _register(self, st: PromptState, traj: Trajectory) -> None:
        st.trajs.append(traj)
        self._by_seq[traj.seq_id] = traj

    def _params(self, num_sampled: int, room: int, calls: int = 0) -> SamplingParams:
        """The sampling parameters of a trajectory that has sampled `num_sampled` tokens, may sample `room` more
        and has made `calls` tool calls (past the limit, the tool tags are no longer stops)."""
        c = self.cfg
        stops = self.stop_strings if calls < c.max_tool_calls or c.over_limit == "end" else ()
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              max_tokens=num_sampled + max(room, 1), stop=stops)

    def _room(self, st: PromptState, num_tokens: int) -> int:
        """Tokens a trajectory may still sample at this length (response cap and max_model_len)."""
        return min(self.cfg.max_response_tokens - (num_tokens - st.prompt_len),
                   self.engine.max_model_len - num_tokens)

    # --- per token ---------------------------------------------------------------------------------------------
    def _on_token(self, out) -> None:
        st = self._anchors.get(out.seq_id)
        if st is not None:  # the prompt is in the cache: start the globals waiting for it
            st.anchor_ready = True
            n, st.pending_globals = st.pending_globals, 0
            self._launch_globals(st, n)
            return
        traj = self._by_seq[out.seq_id]
        st = self._state_of(traj)
        if traj.probe_from is not None:
            seq = self.engine.sequence(traj.seq_id)
            if out.finished or seq.num_tokens - traj.probe_from >= self.cfg.probe_tokens:
                self._decide(st, traj)
        if out.finished:
            self._on_stop(st, traj, out)

    def _state_of(self, traj: Trajectory) -> PromptState:
        return self._states[traj.prompt]

    def _decide(self, st: PromptState, traj: Trajectory) -> None:
        arr = self._arrays(traj)
        P, at = st.prompt_len, traj.probe_from
        sampled = [e for e, s in zip(arr.entropies, arr.sampled) if s]
        probe = arr.entropies[at - P:]
        dec = self.brancher.decide(sampled, probe, key=(self.seed, st.seed_index), trajectory=traj.key,
                                   call=traj.calls, position=at, consecutive=traj.consecutive)
        traj.probe_from = None
        traj.consecutive = traj.consecutive + 1 if dec.branch else 0
        traj.h_tool.append(dec.h_t)
        z = min(self.cfg.beam, self.cfg.leaves - st.count) if dec.branch else 0
        if z > 0:
            self._fork(st, traj, at, z)
        dec.children = max(z, 0)
        st.decisions.append(dec)

    def _fork(self, st: PromptState, traj: Trajectory, at: int, z: int) -> None:
        keys = [f"{traj.key}.{traj.calls}.{i}" for i in range(z)]
        seeds = [derive_seed(self.seed, st.seed_index, key) for key in keys]
        if self.cfg.prefix_mode == "fork":
            seq = self.engine.sequence(traj.seq_id)
            sampled = sum(seq.out_sampled[:at - seq.prompt_len])
            params = self._params(sampled, self._room(st, at), traj.calls)
            ids = self.engine.fork(traj.seq_id, z, at=at, seeds=seeds, params=params)
            base, prefix = st.prompt_len, Arrays()
        else:  # the reference's way: a new request carrying the whole prefix
            prefix = self._arrays(traj).head(at - st.prompt_len)
            tokens = list(st.inp.prompt_ids) + prefix.ids
            params = self._params(0, self._room(st, len(tokens)), traj.calls)
            ids = [self.engine.add(tokens, replace(params, seed=s)) for s in seeds]
            base = at
        st.count += z
        st.active += z
        for key, sid in zip(keys, ids):
            child = Trajectory(key, st.index, sid, at, base, prefix, parent=traj, calls=traj.calls,
                               consecutive=traj.consecutive, tool_ok=list(traj.tool_ok))
            traj.children.append((child, at))
            self._register(st, child)

    def _arrays(self, traj: Trajectory) -> Arrays:
        return traj.prefix + Arrays.of_sequence(self.engine.sequence(traj.seq_id), traj.base)

    # --- tool calls --------------------------------------------------------------------------------------------
    def _on_stop(self, st: PromptState, traj: Trajectory, out) -> None:
        is_tool_stop = (out.finish_reason == "stop" and isinstance(out.stop_reason, str)
                        and out.stop_reason in self.stop_strings)
        if is_tool_stop and traj.calls >= self.cfg.max_tool_calls:
            self._finish(st, traj, "call_limit" if self.cfg.over_limit == "end" else "stop")
            return
        if not is_tool_stop:
            self._finish(st, traj, out.finish_reason or "length")
            return
        seq = self.engine.sequence(traj.seq_id)
        start = 0 if self.cfg.call_in_prompt else st.prompt_len
        call = self.tools.parse(self.tokenizer.decode(seq.token_ids[start:], skip_special_tokens=True))
        if call is None:  # a closing tag without its opening one: plain text, keep sampling
            self.engine.resume(traj.seq_id)
            return
        traj.calls += 1
        self.stats["tool_calls"] += 1
        self._calls.append((traj, call))

    def _submit_calls(self) -> None:
        """Start the calls this step made, together: a batchable tool (a retrieval server) gets them in one
        request."""
        if not self._calls:
            return
        now = time.perf_counter()
        for (traj, _), fut in zip(self._calls, self.tools.submit_many([c for _, c in self._calls])):
            self._pending[fut] = (traj, now, self._step_no)
        self._calls = []

    def _deadline(self) -> float | None:
        return self.cfg.tool_timeout_s or getattr(self.tools, "timeout_s", None)

    def _harvest(self, block: bool, due_only: bool = False) -> None:
        """Append the results of finished (or overdue) calls; with `block`, wait for at least one first
        (or, under sync_tools, for all of them). `due_only` (sync_tools, after a step): only the calls made before
        this step are harvested, all of them, waiting as needed; the ones made in it run on through the next."""
        pending = {f: v for f, v in self._pending.items() if v[2] < self._step_no} if due_only else self._pending
        if not pending:
            return
        deadline = self._deadline()
        if block:
            now = time.perf_counter()
            left = None if deadline is None else max(
                0.0, min(t0 + deadline - now for _, t0, _ in pending.values()))
            mode = "ALL_COMPLETED" if self.cfg.sync_tools else FIRST_COMPLETED
            wait_futures(list(pending), timeout=left, return_when=mode)
        now = time.perf_counter()
        ready = []
        for fut, (traj, t0, _) in pending.items():
            if fut.done():
                ready.append((fut, traj, self.tools.result_of(fut)))
            elif deadline is not None and now - t0 >= deadline:
                fut.cancel()
                ready.append((fut, traj, ToolResult.failure(f"Error: tool call exceeded the {deadline:g} s deadline",
                                                            now - t0)))
        ready.sort(key=lambda r: (self._state_of(r[1]).index, r[1].key))  # a fixed order for one step's results
        for fut, traj, result in ready:
            del self._pending[fut]
            self._append_result(self._state_of(traj), traj, result)

    def _append_result(self, st: PromptState, traj: Trajectory, result: ToolResult) -> None:
        traj.tool_ok.append(bool(result.ok))
        ids = self.tools.protocol.result_ids(self.tokenizer, result)  # tags: <result>; hermes: a tool turn
        seq = self.engine.sequence(traj.seq_id)
        room = self._room(st, seq.num_tokens + len(ids))
        if room < 1:
            traj.result_dropped = True
            self._finish(st, traj, "length")
            return
        self.engine.extend(traj.seq_id, ids, params=self._params(seq.num_sampled, room, traj.calls))
        if self.cfg.mode == "tree":
            traj.probe_from = seq.num_tokens

    # --- ending ------------------------------------------------------------------------------------------------
    def _finish(self, st: PromptState, traj: Trajectory, reason: str) -> None:
        traj.record = self._arrays(traj)
        traj.finish_reason = reason
        self.engine.release(traj.seq_id)
        del self._by_seq[traj.seq_id]
        st.active -= 1
        if st.active == 0:
            self._on_idle(st)

    def _on_idle(self, st: PromptState) -> None:
        """Every trajectory of the prompt has finished: grow the globals (AEPO), fill the budget, or close."""
        c = self.cfg
        if st.presampling:
            st.presampling = False
            first = st.trajs[0]
            sampled = [e for e, s in zip(first.record.entropies, first.record.sampled) if s]
            m = c.initial
            if first.h_tool:
                m = dynamic_global_budget(c.initial, window_entropy(sampled, c.probe_tokens, c.entropy_reduce),
                                          sum(first.h_tool) / len(first.h_tool), c.leaves)
            st.dynamic_m = m
            self._launch_globals(st, min(m - 1, c.leaves - st.count))
            if st.active:
                return
        if st.count < c.leaves:
            self._launch_globals(st, c.leaves - st.count, fill=True)
            return
        st.done = True
        if st.anchor is not None:
            self.engine.release(st.anchor)
            del self._anchors[st.anchor]
