"""The engine process: the one place that owns the `LLMEngine`; it applies the front end's commands between steps
and streams each step's events back in one message.

The HTTP front end (asyncio, uvicorn, pydantic, JSON per token) and the engine (a tight Python loop around torch)
used to share one interpreter lock, so at 32 streams each slowed the other (the server reached 0.41-0.65x the
offline engine's tokens/s). As vLLM splits AsyncLLM from its EngineCore, the engine now runs in a process of its
own (`engine_main`, started by `engine_client.EngineClient`), talking over two one-way pipes:

    front end -> engine   ("add", Job) ("cancel", job id) ("pause" | "resume", ack token) ("stop", reason)
    engine -> front end   ("ready", info) | ("failed", exception)           once, at start
                          ("batch", [(job id, events), ...], snapshot, [ack tokens])   per step / command burst
                          ("closed",)                                        last

Every mutation of the engine happens on this process's main thread: a reader thread turns pipe messages into
inbox commands (as do the tool executor's callbacks), the loop applies all that are waiting, runs one `step()`
over every live sequence (continuous batching: requests join and leave between steps), and sends that step's
events of all jobs together with the engine's counters (free KV blocks, sequences, ...: the front end's
`/health`). When nothing is running the loop blocks on the inbox: no polling. A front end that goes away (its end
of the command pipe closes, even when it was killed) stops the loop, so the process never outlives it.

A job is one request: one prompt, `n` choices. With n > 1 the prompt is prefilled once by an anchor sequence that
samples one throw-away token; the n choices are `fork`ed from it (they share its KV blocks) and the anchor is
released. Agent jobs stop at a tool's closing tag; `agent.py` runs the call and the result is appended with
`extend` when it lands (see `ToolTurns`).

Events (tuples, built per token, so kept cheap): ("token", i, token_id, logprob, entropy), ("call", i, tag,
content, error), ("result", i, ToolResult, result_token_ids), ("finish", i, finish_reason, stop_reason),
("error", message) — after "error" or every choice's "finish" the job is over and owns no sequence.
"""
from __future__ import annotations

import importlib
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace

from arpo.engine import SamplingParams
from arpo.engine.sequence import mix_seed


@dataclass(eq=False)
class Job:
    """What the front end sends for one request (pickled); the engine process fills in the state below."""

    prompt_ids: list[int]
    params: SamplingParams          # the user's sampling (user stop strings only)
    n: int
    seed: int | None = None
    agent: bool = False
    max_tool_calls: int = 0
    id: int = -1                    # set by the front end when it submits the job
    # engine-process state
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
    """The loop of the engine process (runs on its main thread, `run()`); `put` is its thread-safe inbox."""

    def __init__(self, engine, tools, send):
        from arpo.serve.agent import ToolTurns

        self.engine = engine
        self.tools = tools
        self.send = send
        self.turns = ToolTurns(engine, tools, self.put) if tools is not None else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}
        self._owner: dict[int, tuple[Job, int]] = {}   # seq id -> (job, choice index; -1 for an anchor)
        self._paused = False
        self._stop = False
        # idle_s: time blocked with nothing to run (waiting for requests); with `steps`, tells an engine that waits
        # on its front end from one that is busy
        self.counters = {"jobs": 0, "cancelled": 0, "errors": 0, "steps": 0, "idle_s": 0.0}
        self._out: list = []           # (job id, events) of this turn, sent together by `_flush`
        self._finished: list = []      # seq ids whose choice finished this turn, released after the flush
        self._acks: list = []
        self._sent: dict | None = None

    def put(self, cmd: tuple) -> None:
        self._inbox.put(cmd)

    def info(self) -> dict:
        """What the front end needs to validate requests without the engine (sent once, with "ready")."""
        return {"max_model_len": self.engine.max_model_len, "vocab_size": self.engine.model.config.vocab_size,
                "tools": list(self.tools.tools) if self.tools is not None else None,
                "snapshot": self.snapshot()}

    def snapshot(self) -> dict:
        bm = self.engine.block_manager
        return {"free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks, "sequences": len(self.engine.seqs),
                "paused": self._paused, **self.counters}

    # --- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop:
            busy = not self._paused and self.engine.has_unfinished()
            self._apply(block=not busy)
            if not self._stop and not self._paused and self.engine.has_unfinished():
                self._step()
            self._flush()
            if self._finished:  # after the events are out: a choice's last token is not held up by the releases
                for sid in self._finished:
                    self._release(sid)
                self._finished = []
                self._flush()   # the counters with those blocks free

    def _step(self) -> None:
        self.counters["steps"] += 1
        try:
            outs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a failed step ends its jobs, never the server
            self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        events: dict[Job, list] = {}
        for out in outs:
            self._on_token(out, events)
        for job, evs in events.items():
            self._emit(job, evs)

    def _flush(self) -> None:
        """One message per turn of the loop: every job's events, the counters, the acknowledgements."""
        snap = self.snapshot()
        if self._out or self._acks or snap != self._sent:
            self.send(("batch", self._out, snap, self._acks))
            self._out, self._acks, self._sent = [], [], snap

    def _apply(self, block: bool) -> None:
        try:
            if block:
                t0 = time.perf_counter()
                cmd = self._inbox.get()
                self.counters["idle_s"] = round(self.counters["idle_s"] + time.perf_counter() - t0, 4)
            else:
                cmd = self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._command(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break

    def _command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(cmd[1])
        elif kind == "cancel":
            job = self._jobs.get(cmd[1])
            if job is not None:
                self._cancel(job)
        elif kind == "tool":
            job, i, future = cmd[1:]
            if not job.over:
                self._emit(job, self.turns.on_result(job, i, future, self._finish))
        elif kind in ("pause", "resume"):
            self._paused = kind == "pause"
            self._acks.append(cmd[1])
        elif kind == "stop":
            self._fail_all(cmd[1])
            self._stop = True
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    # --- jobs -------------------------------------------------------------------------------------------------------
    def _add(self, job: Job) -> None:
        self.counters["jobs"] += 1
        self._jobs[job.id] = job
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
        self._owner.pop(job.seq_ids[i], None)
        self._finished.append(job.seq_ids[i])   # released by `run` once this turn's events are sent
        job.done[i] = True
        if all(job.done):
            job.over = True
            self._jobs.pop(job.id, None)
        return [("finish", i, reason, stop)]

    def _cancel(self, job: Job) -> None:
        if job.over:
            return
        job.over = True
        self._jobs.pop(job.id, None)
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
        self._emit(job, [("error", message)])

    def _fail_all(self, message: str) -> None:
        for job in list(self._jobs.values()):
            self._error(job, message)

    def _emit(self, job: Job, evs: list) -> None:
        if evs:
            self._out.append((job.id, evs))


# ---------------------------------------------------------------------------------------------------- the process
def engine_main(commands_fd: int, out_fd: int) -> None:
    """The engine process (`python -m arpo.serve.engine_loop COMMANDS_FD EVENTS_FD`): read the start message
    (the builder, checkpoint, run config, max_seqs, tools), build the engine (and tools) with it, say "ready" (or
    why not), then run the loop until the front end says stop or goes away. Ctrl-C is the front end's to handle (a
    terminal sends it to the whole process group); SIGTERM closes the tools on the way out."""
    from multiprocessing.connection import Connection

    from arpo.serve.server import freeze_startup_objects

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    commands, out = Connection(commands_fd, writable=False), Connection(out_fd, readable=False)
    executor = None
    try:
        try:
            _, parts, checkpoint, cfg, max_seqs, tools = commands.recv()
        except EOFError:
            return  # the front end went away before it said what to load
        module, _, name = parts.partition(":")
        engine, executor = getattr(importlib.import_module(module), name)(checkpoint, cfg, max_seqs, tools)
        loop = EngineLoop(engine, executor, out.send)
    except BaseException as exc:  # noqa: BLE001 - every start-up failure goes back to the front end, named
        if executor is not None:
            executor.close()
        out.send(("failed", _portable(exc)))
        return
    reader = threading.Thread(target=_read_commands, args=(commands, loop.put), name="arpo-engine-commands",
                              daemon=True)
    try:
        out.send(("ready", loop.info()))
        freeze_startup_objects()  # the model, torch and the tokenizer: out of the collector's walks
        reader.start()
        loop.run()
        out.send(("closed",))
    except OSError:  # the front end went away while we were sending: nobody to answer
        pass
    finally:
        if executor is not None:
            executor.close()


def _read_commands(commands, put) -> None:
    try:
        while True:
            put(commands.recv())
    except (EOFError, OSError):  # the front end closed its end or died
        put(("stop", "the front end went away"))


def _portable(exc: BaseException) -> BaseException:
    """`exc` when it survives pickling (ConfigError, CheckpointError, ...: the CLI names them), else a
    RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    from arpo.serve.engine_loop import engine_main as _main  # the importable copy: Job pickles by that name

    _main(int(sys.argv[1]), int(sys.argv[2]))
