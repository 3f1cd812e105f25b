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

Limits of the fallback (no namespaces, not root): the audit hook is Python-level, so ctypes or a spawned
program can still reach the network or the user's files. Run as root or where user namespaces are allowed.
"""
from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from arpo.tools.base import BaseTool, ToolResult, strip_code_fence, truncate

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
}


class _UidPool:
    """Hands out throw-away uids (only when the host runs as root), unique across threads *and* processes.

    Each uid in use is held by an exclusive `flock` on `<lock_dir>/<uid>`, so several trainers or test workers on
    one machine never share one (sharing would let one call's cleanup kill another's processes). The search
    starts after the last uid handed out, so a uid whose zombies are not yet reaped is not reused at once.
    """

    def __init__(self, base: int, size: int = 4096, lock_dir: str = "/tmp/arpo-sandbox-uids"):
        self.base, self.size, self.lock_dir = base, size, lock_dir
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self._next = int.from_bytes(os.urandom(2), "little") % size
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def acquire(self) -> int:
        with self._lock:
            start, self._next = self._next, self._next + 1
        for i in range(self.size):
            uid = self.base + (start + i) % self.size
            fd = os.open(os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            with self._lock:
                self._held[uid] = fd
            return uid
        raise RuntimeError(f"no free sandbox uid in [{self.base}, {self.base + self.size})")

    def release(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid)
        os.close(fd)


_UID_POOLS: dict[int, _UidPool] = {}
_UID_POOLS_LOCK = threading.Lock()


def _uid_pool(base: int) -> _UidPool:
    with _UID_POOLS_LOCK:
        if base not in _UID_POOLS:
            _UID_POOLS[base] = _UidPool(base)
        return _UID_POOLS[base]


def kill_uid(uid: int, rounds: int = 50) -> int:
    """SIGKILL every process whose real uid is `uid` (repeated until none is found); returns how many were hit."""
    killed = 0
    for _ in range(rounds):
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                os.kill(int(entry), signal.SIGKILL)
                                found += 1
                            break
            except (OSError, ValueError):
                continue
        killed += found
        if not found:
            break
    return killed


def _count_processes(uid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


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
    """The `python` tool: `PythonSandbox(timeout_s=5, memory_mb=1024, max_output_chars=4000).run(code)`."""

    name = tag = "python"

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
    ):
        if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0:
            raise ValueError("PythonSandbox: timeout_s, memory_mb and max_processes must be positive")
        self.timeout_s, self.memory_mb, self.max_output_chars = float(timeout_s), int(memory_mb), max_output_chars
        self.max_processes, self.max_file_mb, self.max_output_bytes = max_processes, max_file_mb, max_output_bytes
        self.namespaces, self.python, self.cacheable = namespaces, python, cacheable
        self._uids = _uid_pool(uid_base) if drop_privileges and os.geteuid() == 0 else None
        # an interpreter installed under a root-only directory (pyenv in /root) cannot import after the uid drop
        # unless the sandbox keeps CAP_DAC_READ_SEARCH (read anything; still no writes, signals or NPROC bypass)
        stdlib = os.path.dirname(os.__file__)
        self._keep_read_search = bool(self._uids) and not (_world_searchable(stdlib) and _world_searchable(python))

    def run(self, text: str) -> ToolResult:
        start = time.perf_counter()
        try:
            return self._run(strip_code_fence(text), start)
        except Exception as exc:  # noqa: BLE001 - the host must never see the snippet's trouble
            return ToolResult.failure(f"Error: sandbox failure: {type(exc).__name__}: {exc}",
                                      time.perf_counter() - start)

    def _run(self, code: str, start: float) -> ToolResult:
        uid = self._uids.acquire() if self._uids else None
        workdir = tempfile.mkdtemp(prefix="arpo-sandbox-")
        status_r, status_w = os.pipe()
        proc = None
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)
            nproc = self.max_processes if uid is not None else _count_processes(os.getuid()) + self.max_processes
            cfg = {"cpu_s": max(1, int(self.timeout_s + 0.999)), "memory_mb": self.memory_mb,
                   "file_mb": self.max_file_mb, "nproc": nproc, "uid": uid, "namespaces": self.namespaces,
                   "keep_read_search": self._keep_read_search}
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "USER": "sandbox",
                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
            proc = subprocess.Popen(
                [self.python, "-I", "-S", "-B", _CHILD, str(status_w), json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                pass_fds=(status_w,), start_new_session=True, close_fds=True,
            )
            os.close(status_w)
            status_w = -1
            try:
                proc.stdin.write(code.encode("utf-8", errors="replace"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            out, err, why = self._collect(proc, start)
            status = _read_all(status_r)
        finally:
            if proc is not None:
                _killpg(proc.pid)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if uid is not None:
                kill_uid(uid)
                self._uids.release(uid)
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
        return self._result(out, err, why, status, proc.returncode, time.perf_counter() - start)

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

    def _result(self, out: bytes, err: bytes, why: str, status: str, rc: int, latency: float) -> ToolResult:
        stdout, bad_out = _decode(out)
        stderr, _ = _decode(err)
        lines = status.split("\n")
        iso = next((line[4:] for line in lines if line.startswith("iso ")), "")
        final = next((line for line in reversed(lines) if line and not line.startswith("iso ")), "")
        meta = {"isolation": iso, "returncode": rc}
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


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
