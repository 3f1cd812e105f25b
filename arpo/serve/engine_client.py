"""The front end's handle on the engine process (`engine_loop.engine_main`): start it, submit and cancel jobs,
receive their events, know when it is gone, stop it.

    engine = EngineClient("runs/embedded/step_000040", cfg, max_seqs=64, tools=["python"])
    engine.submit(Job(prompt_ids, params, n=1), emit)   # emit(events) once per engine step that touched the job
    engine.snapshot                                     # free KV blocks, sequences, counters (as of the last step)
    engine.close()                                      # the process is gone when this returns

The process is a fresh interpreter (`python -m arpo.serve.engine_loop`, the two pipes passed as file descriptors:
no copy of the front end's threads or locks, and unlike multiprocessing's `spawn` it does not re-import the
caller's main script) that builds the engine from the checkpoint itself; the front end loads only the tokenizer. One
reader thread here receives the engine's per-step batches and hands each job its events through the job's `emit` (the
server's `Mailbox` moves them onto the event loop; `arpo chat` reads a queue). It spends its time blocked in `recv`, so
it costs the front end's interpreter lock little, and it is never the main thread, so Ctrl-C cannot interrupt it
half-way through a message.

When the engine process dies (killed, out of memory, a crash) the pipe reaches its end: every job still running
gets an ("error", reason) event, `alive` turns False and `exit_reason` says why (`/health` reports it, new requests
are refused). `close()` asks the process to stop (running jobs end with "server shutting down"), waits for it and
terminates it if it does not exit; the process also stops by itself when this side's pipe closes, so it never
outlives the front end, even one that was killed.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from arpo.serve.engine_loop import Job

START_TIMEOUT_S = 600.0   # loading a large checkpoint on a loaded machine
# what the engine process calls to build its (engine, tool executor): `module:function(checkpoint, cfg, max_seqs,
# tools)`, imported there. A model class of one's own is served by naming a builder of its own (the tests serve a
# scripted policy this way); the front end still loads the tokenizer from `checkpoint`.
DEFAULT_PARTS = "arpo.serve.server:load_parts"
ACK_TIMEOUT_S = 60.0


class EngineClient:
    def __init__(self, checkpoint: str, cfg, max_seqs: int, tools: list[str] | None = None,
                 start_timeout: float = START_TIMEOUT_S, parts: str = DEFAULT_PARTS):
        from arpo.build import load_tokenizer

        import arpo

        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.abspath(arpo.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "arpo.serve.engine_loop", str(commands_in), str(events_out)],
                pass_fds=(commands_in, events_out), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(commands_in)   # only the child's copies stay open: its exit (or ours) ends the pipes
            os.close(events_out)
        self._commands = Connection(commands_out, readable=False)
        self._events = Connection(events_in, writable=False)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()               # the job and ack tables (reader thread vs callers)
        self._jobs: dict[int, list] = {}            # job id -> [emit, n, choices finished]
        self._acks: dict[int, threading.Event] = {}
        self._ids = itertools.count()
        self._closing = False
        self.exit_reason: str | None = None
        try:
            self._send(("start", parts, checkpoint, cfg, max_seqs, tools))
            self.tokenizer = load_tokenizer(checkpoint)   # while the child loads the model
            self.protocol = _front_protocol(cfg, self.tokenizer, tools)
            info = self._handshake(start_timeout)
        except BaseException:
            self._reap(5.0)
            raise
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.tools: list[str] | None = info["tools"]
        self.snapshot: dict = info["snapshot"]
        self._reader = threading.Thread(target=self._read, name="arpo-engine-events", daemon=True)
        self._reader.start()

    # --- start and end ------------------------------------------------------------------------------------------
    def _handshake(self, timeout: float) -> dict:
        if not self._events.poll(timeout):
            raise RuntimeError(f"the engine process did not start within {timeout:g} s")
        try:
            msg = self._events.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited with code {self._wait(5.0)} before it was "
                               "ready") from None
        if msg[0] == "failed":
            raise msg[1]
        return msg[1]

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine process (idempotent); running jobs end with an error event."""
        if self._closing:
            return
        self._closing = True
        try:
            self._send(("stop", "server shutting down"))
        except OSError:
            pass
        self._reader.join(timeout)
        self._reap(timeout)

    def _wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _reap(self, timeout: float) -> None:
        if self._wait(timeout) is None:
            self.process.terminate()
            if self._wait(5.0) is None:
                self.process.kill()
                self.process.wait()
        self._commands.close()
        self._events.close()

    # --- commands (any thread) ----------------------------------------------------------------------------------
    def submit(self, job: Job, emit) -> None:
        """Run `job`; `emit(events)` is called on the reader thread with each step's events for it."""
        with self._lock:
            job.id = next(self._ids)
            dead = self.exit_reason
            if dead is None:
                self._jobs[job.id] = [emit, job.n, 0]
        if dead is not None:
            emit([("error", dead)])
            return
        try:
            self._send(("add", job))
        except OSError:
            pass  # the reader sees the end of the pipe and fails the job

    def cancel(self, job: Job) -> None:
        """Stop `job` and release its sequences (no more events are delivered for it)."""
        with self._lock:
            live = self._jobs.pop(job.id, None) is not None
        if live:
            try:
                self._send(("cancel", job.id))
            except OSError:
                pass

    def pause(self) -> None:
        """Stop stepping after the current step (commands are still applied); returns once the engine holds and
        `snapshot` shows its state. For updating weights between steps, and for tests that need a request to
        stay in flight."""
        self._ack("pause")

    def resume(self) -> None:
        self._ack("resume")

    def _ack(self, kind: str) -> None:
        done = threading.Event()
        with self._lock:
            token = next(self._ids)
            self._acks[token] = done
        if self.alive:
            self._send((kind, token))
        if not done.wait(ACK_TIMEOUT_S):
            raise RuntimeError(f"the engine did not acknowledge {kind!r} within {ACK_TIMEOUT_S:g} s")
        if not self.alive:
            raise RuntimeError(f"the engine is not running: {self.exit_reason}")

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._commands.send(msg)

    # --- the reader thread --------------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self._events.recv()
                if msg[0] == "closed":
                    break
                self._dispatch(*msg[1:])
        except (EOFError, OSError):
            pass
        self._gone()

    def _dispatch(self, batch: list, snapshot: dict, acks: list) -> None:
        self.snapshot = snapshot
        for job_id, evs in batch:
            with self._lock:
                entry = self._jobs.get(job_id)
                if entry is None:   # cancelled here already
                    continue
                entry[2] += sum(1 for e in evs if e[0] == "finish")
                if entry[2] >= entry[1] or any(e[0] == "error" for e in evs):
                    del self._jobs[job_id]
            entry[0](evs)
        if acks:
            with self._lock:
                events = [self._acks.pop(t) for t in acks if t in self._acks]
            for e in events:
                e.set()

    def _gone(self) -> None:
        """The engine's end of the pipe closed: fail what is still running, release whoever waits on an ack."""
        if self._closing:
            reason = "server shutting down"
        else:
            reason = f"the engine process exited (exit code {self._wait(5.0)})"
        with self._lock:
            self.exit_reason = reason
            jobs, self._jobs = self._jobs, {}
            acks, self._acks = self._acks, {}
        for emit, _, _ in jobs.values():
            emit([("error", reason)])
        for e in acks.values():
            e.set()


def _front_protocol(cfg, tokenizer, tools: list[str] | None):
    """The tool protocol the front end renders prompts and chat history with (None without tools): the one the
    engine process's executor speaks, built from the same config (hermes: the same tools' schemas)."""
    if not tools:
        return None
    from dataclasses import replace

    from arpo.build import build_protocol

    return build_protocol(replace(cfg, tools=replace(cfg.tools, enabled=list(tools))), tokenizer)

