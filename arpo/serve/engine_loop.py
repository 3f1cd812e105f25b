"""The one thread that owns the `LLMEngine`: it applies requests' commands between steps and streams tokens out.

The HTTP front end is asyncio; the engine is synchronous and not thread-safe. Instead of a lock around
`generate` (one request at a time), every mutation of the engine happens on this thread: the front end puts
commands in an inbox (add a job, cancel it, a tool call finished, pause), the thread applies all that are waiting,
runs one `step()` over every live sequence (continuous batching: requests join and leave between steps), and
hands each job its step's events through the job's `emit` callback (thread-safe, one call per job per step).
When nothing is running the thread blocks on the inbox: no polling.

A job is one request: one prompt, `n` choices. With n > 1 the prompt is prefilled once by an anchor sequence that
samples one throw-away token; the n choices are `fork`ed from it (they share its KV blocks) and the anchor is
released. Agent jobs stop at a tool's closing tag; `agent.py` runs the call and the result is appended with
`extend` when it lands (see `ToolTurns`).

Events (tuples, built per token, so kept cheap): ("token", i, token_id, logprob, entropy), ("call", i, tag,
content, error), ("result", i, ToolResult, result_token_ids), ("finish", i, finish_reason, stop_reason),
("error", message) — after "error" or every choice's "finish" the job is over and owns no sequence.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

from arpo.engine import SamplingParams
from arpo.engine.sequence import mix_seed


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams          # the user's sampling (user stop strings only)
    n: int
    emit: Callable[[list[tuple]], None]
    seed: int | None = None
    agent: bool = False
    max_tool_calls: int = 0
    # engine-thread state
    seq_ids: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    done: list = field(default_factory=list)
    anchor: int | None = None
    over: bool = False

    def seeds(self) -> list[int] | None:
        if self.seed is None:
            return None
        return [self.seed] if self.n == 1 else [mix_seed(self.seed, i) for i in range(self.n)]


class EngineLoop:
    def __init__(self, engine, tools=None):
        from arpo.serve.agent import ToolTurns

        self.engine = engine
        self.turns = ToolTurns(engine, tools, self._inbox_put) if tools is not None else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owner: dict[int, tuple[Job, int]] = {}   # seq id -> (job, choice index; -1 for an anchor)
        self._paused = False
        self._stop = False
        self.counters = {"jobs": 0, "cancelled": 0, "errors": 0}
        self.snapshot: dict = {}
        self._take_snapshot()
        self._thread = threading.Thread(target=self._run, name="arpo-engine-loop", daemon=True)

    # --- called from any thread --------------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        self._inbox_put(("add", job))

    def cancel(self, job: Job) -> None:
        self._inbox_put(("cancel", job))

    def pause(self) -> None:
        """Stop stepping after the current step (commands are still applied); returns once the loop holds.
        For updating weights in place between steps, and for tests that need a request to stay in flight."""
        self._ack("pause")

    def resume(self) -> None:
        self._ack("resume")

    def close(self, timeout: float = 30.0) -> None:
        self._inbox_put(("stop",))
        self._thread.join(timeout)

    def _ack(self, kind: str) -> None:
        done = threading.Event()
        self._inbox_put((kind, done))
        if not done.wait(60.0):
            raise RuntimeError(f"engine loop did not acknowledge {kind!r} within 60 s")

    def _inbox_put(self, cmd: tuple) -> None:
        self._inbox.put(cmd)

    # --- the thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            busy = not self._paused and self.engine.has_unfinished()
            self._apply(block=not busy)
            if self._stop or self._paused or not self.engine.has_unfinished():
                continue
            try:
                outs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step ends its jobs, never the server
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                continue
            events: dict[Job, list] = {}
            for out in outs:
                self._on_token(out, events)
            for job, evs in events.items():
                job.emit(evs)
            self._take_snapshot()

    def _apply(self, block: bool) -> None:
        try:
            cmd = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._command(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._take_snapshot()

    def _command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(cmd[1])
        elif kind == "cancel":
            self._cancel(cmd[1])
        elif kind == "tool":
            job, i, future = cmd[1:]
            if not job.over:
                self._emit_one(job, self.turns.on_result(job, i, future, self._finish))
        elif kind in ("pause", "resume"):
            self._paused = kind == "pause"
            cmd[1].set()
        elif kind == "stop":
            self._fail_all("server shutting down")
            self._stop = True

    def _take_snapshot(self) -> None:
        bm = self.engine.block_manager
        self.snapshot = {"free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                         "sequences": len(self.engine.seqs), "paused": self._paused, **self.counters}

    # --- jobs -------------------------------------------------------------------------------------------------------
    def _add(self, job: Job) -> None:
        self.counters["jobs"] += 1
        job.seq_ids, job.calls, job.done = [None] * job.n, [0] * job.n, [False] * job.n
        try:
            if job.n == 1:
                sid = self.engine.add(job.prompt_ids, self._params(job, 0))
                job.seq_ids[0] = sid
                self._owner[sid] = (job, 0)
            else:
                job.anchor = self.engine.add(job.prompt_ids, SamplingParams(temperature=0, max_tokens=1,
                                                                            ignore_eos=True))
                self._owner[job.anchor] = (job, -1)
        except ValueError as exc:
            self._error(job, str(exc))

    def _params(self, job: Job, i: int) -> SamplingParams:
        seeds = job.seeds()
        stops = job.params.stop
        if job.agent and job.calls[i] < job.max_tool_calls:
            stops = stops + tuple(s for s in self.turns.stop_strings if s not in stops)
        return replace(job.params, stop=stops, seed=seeds[i] if seeds else job.params.seed)

    def _fork(self, job: Job) -> None:
        children = self.engine.fork(job.anchor, job.n, at=len(job.prompt_ids), seeds=job.seeds(),
                                    params=self._params(job, 0))
        for i, sid in enumerate(children):
            job.seq_ids[i] = sid
            self._owner[sid] = (job, i)
        self._release(job.anchor)
        job.anchor = None

    def _on_token(self, out, events: dict) -> None:
        job, i = self._owner[out.seq_id]
        if i < 0:
            self._fork(job)
            return
        evs = events.setdefault(job, [])
        evs.append(("token", i, out.token_id, out.logprob, out.entropy))
        if not out.finished:
            return
        if job.agent and self.turns.is_tool_stop(job, i, out):
            evs.extend(self.turns.on_stop(job, i, out, self._finish))
            return
        evs.extend(self._finish(job, i, out.finish_reason, out.stop_reason))

    def _finish(self, job: Job, i: int, reason: str, stop) -> list[tuple]:
        self._release(job.seq_ids[i])
        job.done[i] = True
        if all(job.done):
            job.over = True
        return [("finish", i, reason, stop)]

    def _cancel(self, job: Job) -> None:
        if job.over:
            return
        job.over = True
        self.counters["cancelled"] += 1
        for i, sid in enumerate(job.seq_ids):
            if sid is not None and not job.done[i]:
                self._release(sid)
        if job.anchor is not None:
            self._release(job.anchor)

    def _release(self, sid: int) -> None:
        self._owner.pop(sid, None)
        if sid in self.engine.seqs:
            self.engine.release(sid)

    def _error(self, job: Job, message: str) -> None:
        self._cancel(job)
        self.counters["cancelled"] -= 1
        self.counters["errors"] += 1
        job.emit([("error", message)])

    def _fail_all(self, message: str) -> None:
        for job in {job for job, _ in list(self._owner.values())}:
            self._error(job, message)

    def _emit_one(self, job: Job, evs: list) -> None:
        if evs:
            job.emit(evs)
