"""A Python tool that survives the code a policy writes while it is being trained by trial and error.

The reference ran model code with a bare `subprocess.run(timeout=120)`: one fork bomb, `rm -rf` or memory bomb
takes the trainer down. Here every call gets a fresh interpreter (`_sandbox_child.py`) with:
  * wall-clock timeout (host side) and RLIMIT_CPU; RLIMIT_AS (memory), RLIMIT_NPROC, RLIMIT_FSIZE, no core dumps;
  * a private temporary working directory, removed afterwards; a scrubbed environment (no inherited secrets);
  * no network: a new network namespace where the kernel permits it, else sockets refused by an audit hook;
  * when started as root: a throw-away uid per concurrent call, so NPROC is enforced, files outside the working
    directory are read-only, foreign processes cannot be signalled, and stragglers are found by uid;
  * a new PID namespace where permitted, so nothing the snippet spawns (even after `setsid`) outlives the call;
    otherwise the process group is killed and the bootstrap, a child subreaper, kills adopted orphans;
  * stdout/stderr captured with a hard byte cap, decoded as UTF-8, truncated for the model.
Whatever the code does, `run` returns a ToolResult; `ok` is True only when the code finished normally.

Warm pool: starting the interpreter is most of a call's latency (~50 ms of ~55 ms for `print(1)`), and a tree
rollout waits on dozens of calls per step. So `prestart` children per sandbox are started ahead, each with its own
uid, working directory, status pipe and this sandbox's limits, and wait on stdin; nothing call-specific happens in
the bootstrap before the code arrives, so a warm call is the same call minus the start-up. Each child still runs
exactly one snippet and is then destroyed: one fresh interpreter per call stays the rule. Waiting children get EOF
and leave (removing their working directory) when the host dies, since only the host holds their stdin; a fork of
the host (multiprocessing) has those fds pointed at /dev/null.

Limits of the fallback (no namespaces, not root): the audit hook is Python-level, so ctypes or a spawned
program can still reach the network or the user's files. Run as root or where user namespaces are allowed.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import weakref

from arpo.tools._sandbox_pool import (  # noqa: F401 - kill_uid and _uid_pool are part of the tool's surface
    _Recipe, _WarmPool, _count_processes, _killpg, _uid_pool, kill_uid,
)
from arpo.tools.base import BaseTool, ToolResult, strip_code_fence, truncate

_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
}


def _world_searchable(path: str) -> bool:
    """True when a uid that owns nothing can reach `path` (every directory on the way has o+x)."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _decode(data: bytes) -> tuple[str, bool]:
    """UTF-8 text with control characters (but newline and tab) dropped; flag says the bytes were not clean text."""
    text = data.decode("utf-8", errors="replace")
    clean = "".join(c for c in text if c in "\n\t" or (c >= " " and c != "\x7f"))
    return clean.replace("\ufffd", "?"), ("\ufffd" in text) or len(clean) != len(text)


class PythonSandbox(BaseTool):
    """The `python` tool: `PythonSandbox(timeout_s=5, memory_mb=1024, max_output_chars=4000).run(code)`.

    `prestart` children wait ready for the next calls (0: start one per call). `close()` (or leaving a `with`
    block, or garbage collection, or interpreter exit) kills the waiting ones for good; `run` keeps working
    afterwards, starting one child per call.
    """

    name = tag = "python"
    description = "Run Python code in a sandbox (no network) and return what it prints."
    argument, argument_description = "code", "the Python source to run; print() what you need"

    def __init__(
        self,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        max_output_chars: int = 4000,
        max_processes: int = 32,
        max_file_mb: int = 16,
        max_output_bytes: int = 1 << 20,
        namespaces: bool = True,
        drop_privileges: bool = True,
        uid_base: int = 1_900_000_000,
        python: str = sys.executable,
        cacheable: bool = True,
        prestart: int = 2,
    ):
        if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0:
            raise ValueError("PythonSandbox: timeout_s, memory_mb and max_processes must be positive")
        if isinstance(prestart, bool) or not isinstance(prestart, int) or prestart < 0:
            raise ValueError(f"PythonSandbox: prestart must be an int >= 0 (children started ahead of calls; "
                             f"0 starts one per call), got {prestart!r}")
        self.timeout_s, self.memory_mb, self.max_output_chars = float(timeout_s), int(memory_mb), max_output_chars
        self.max_processes, self.max_file_mb, self.max_output_bytes = max_processes, max_file_mb, max_output_bytes
        self.namespaces, self.python, self.cacheable = namespaces, python, cacheable
        self._uids = _uid_pool(uid_base) if drop_privileges and os.geteuid() == 0 else None
        # an interpreter installed under a root-only directory (pyenv in /root) cannot import after the uid drop
        # unless the sandbox keeps CAP_DAC_READ_SEARCH (read anything; still no writes, signals or NPROC bypass)
        stdlib = os.path.dirname(os.__file__)
        self._keep_read_search = bool(self._uids) and not (_world_searchable(stdlib) and _world_searchable(python))
        self._pool = _WarmPool(prestart)
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._pool.start(self._recipe())

    @property
    def prestart(self) -> int:
        """How many children wait ready (fixed at construction)."""
        return self._pool.size

    @property
    def warm_stats(self) -> dict:
        """Calls served by a pre-started child (`hits`) or a child started for them (`misses`); `idle_pids`."""
        return {"hits": self._pool.hits, "misses": self._pool.misses, "idle_pids": self._pool.idle_pids()}

    def close(self) -> None:
        """Kill the idle children, release their uids, remove their working directories; idempotent."""
        self._finalizer()

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, text: str) -> ToolResult:
        start = time.perf_counter()
        try:
            return self._run(strip_code_fence(text), start)
        except Exception as exc:  # noqa: BLE001 - the host must never see the snippet's trouble
            return ToolResult.failure(f"Error: sandbox failure: {type(exc).__name__}: {exc}",
                                      time.perf_counter() - start)

    def _recipe(self) -> _Recipe:
        """Read at every call, so a changed attribute never reaches a child started with the old settings."""
        cfg = {"cpu_s": max(1, int(self.timeout_s + 0.999)), "memory_mb": self.memory_mb,
               "file_mb": self.max_file_mb, "namespaces": self.namespaces, "keep_read_search": self._keep_read_search}
        return _Recipe(self.python, tuple(sorted(cfg.items())), self._uids)

    def _run(self, code: str, start: float) -> ToolResult:
        recipe = self._recipe()
        child = self._pool.take(recipe)
        warm = child is not None
        if child is None:
            child = recipe.start()
        in_pid_namespace = False
        try:
            # without a uid of its own the snippet shares RLIMIT_NPROC with the host's user: allow as many new
            # processes as max_processes on top of what that user runs now (counted when the code goes out)
            nproc = self.max_processes + (0 if child.uid is not None else _count_processes(os.getuid()))
            child.send(nproc, code)
            out, err, why = self._collect(child.proc, start)
            status = _read_all(child.status_r)
            in_pid_namespace = "pid=1" in _isolation(status).split()
        finally:
            child.close(in_pid_namespace=in_pid_namespace)
        return self._result(out, err, why, status, child.proc.returncode, time.perf_counter() - start, warm)

    def _collect(self, proc: subprocess.Popen, start: float) -> tuple[bytes, bytes, str]:
        """Read stdout/stderr until the process exits, the wall clock runs out, or output passes the byte cap."""
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        sel = selectors.DefaultSelector()
        for pipe in bufs:
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, selectors.EVENT_READ)
        deadline, why, total, exited_at = start + self.timeout_s, "", 0, None
        while sel.get_map():
            now = time.perf_counter()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                _killpg(proc.pid)  # stragglers would keep the pipes open
            if exited_at is not None and now - exited_at > 0.5:
                break
            if exited_at is None and now > deadline:
                why = f"Error: TimeoutError: execution exceeded the {self.timeout_s:g} s time limit (killed)"
                break
            for key, _ in sel.select(timeout=0.05):
                try:
                    chunk = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                total += len(chunk)
                buf = bufs[key.fileobj]
                room = self.max_output_bytes - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if total > 2 * self.max_output_bytes:
                    why = f"Error: output exceeded {self.max_output_bytes} bytes (killed)"
                    break
            if why:
                break
        sel.close()
        if why:
            _killpg(proc.pid)
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), why

    def _result(self, out: bytes, err: bytes, why: str, status: str, rc: int, latency: float,
                warm: bool) -> ToolResult:
        stdout, bad_out = _decode(out)
        stderr, _ = _decode(err)
        lines = status.split("\n")
        iso = _isolation(status)
        final = next((line for line in reversed(lines) if line and not line.startswith("iso ")), "")
        meta = {"isolation": iso, "returncode": rc, "warm": warm}
        if not why:
            if final.startswith("signal "):
                sig = int(final.split()[1])
                why = "Error: " + _SIGNAL_REASONS.get(sig, f"killed by signal {signal.Signals(sig).name}")
            elif final.startswith("exc MemoryError"):
                why = f"Error: MemoryError: the {self.memory_mb} MB memory limit was exceeded"
            elif final.startswith("exc "):
                why = f"Error: {final[4:]} raised"
            elif final.startswith("exit "):
                why = f"Error: the code exited with status {final[5:]}"
            elif final != "ok":
                why = f"Error: the process ended abruptly (status {rc}; os._exit or a crash) before the code finished"
            elif bad_out:
                why = "Error: the output is binary (not UTF-8 text); undecodable bytes were replaced"
        body = stdout if not stderr.strip() else (f"{stdout.rstrip()}\n{stderr}" if stdout.strip() else stderr)
        body = truncate(body.strip("\n"), self.max_output_chars)
        if why:
            return ToolResult(f"{body}\n{why}" if body else why, False, latency, why, meta)
        return ToolResult(body, True, latency, "", meta)


def _isolation(status: str) -> str:
    """The bootstrap's `iso net=.. pid=.. uid=..` report from its status lines ('' if it never got that far)."""
    return next((line[4:] for line in status.split("\n") if line.startswith("iso ")), "")


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
