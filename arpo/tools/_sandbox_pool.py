"""The sandbox's processes: throw-away uids, starting a bootstrap child and removing every trace of it, and the
warm pool of children started ahead of the calls (see `arpo.tools.sandbox` for why each exists)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")

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


_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "USER": "sandbox", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@dataclass(frozen=True)
class _Recipe:
    """How one sandbox configuration starts a child; a child started from one recipe never serves another."""

    python: str
    cfg: tuple  # sorted (key, value) pairs fixed per configuration: limits, namespaces, capabilities
    uids: _UidPool | None

    def start(self) -> "_Child":
        """A bootstrap started and blocked on stdin, with its own uid (as root), working directory and status pipe."""
        uid = self.uids.acquire() if self.uids else None
        child, status_w = _Child(self, uid), -1
        try:
            child.workdir = tempfile.mkdtemp(prefix="arpo-sandbox-")
            child.status_r, status_w = os.pipe()
            if uid is not None:
                os.chown(child.workdir, uid, uid)
            env = dict(_ENV, HOME=child.workdir, TMPDIR=child.workdir)
            child.proc = subprocess.Popen(
                [self.python, "-I", "-S", "-B", _CHILD, str(status_w), json.dumps(dict(self.cfg, uid=uid))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=child.workdir, env=env,
                pass_fds=(status_w,), start_new_session=True, close_fds=True,
            )
        except BaseException:
            child.close()
            raise
        finally:
            if status_w >= 0:
                os.close(status_w)
        return child


class _Child:
    """One started bootstrap and what it owns; it runs exactly one call, then `close` removes every trace of it."""

    def __init__(self, recipe: _Recipe, uid: int | None):
        self.recipe, self.uid, self.workdir, self.status_r = recipe, uid, "", -1
        self.proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, nproc: int, code: str) -> None:
        """The per-call settings (one JSON line) and the code; closing stdin lets the bootstrap go."""
        try:
            self.proc.stdin.write(json.dumps({"nproc": nproc}).encode() + b"\n")
            self.proc.stdin.write(code.encode("utf-8", errors="replace"))
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def close(self, in_pid_namespace: bool = False) -> None:
        """Kill the process group, reap, kill stragglers by uid, release the uid, remove the working directory.

        `in_pid_namespace`: the bootstrap reported running the call in a PID namespace. If it then exited by
        itself (not killed here), it had waited for that namespace's init, whose exit killed and reaped everything
        in it, so the hunt through /proc for the uid's processes (~5 ms a call) is skipped."""
        exited_by_itself = False
        if self.proc is not None and in_pid_namespace:
            try:  # normally exiting already (its pipes reached EOF): let it finish before anything is killed
                self.proc.wait(timeout=0.1)
                exited_by_itself = self.proc.returncode >= 0
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            _killpg(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    pipe.close()
                except OSError:
                    pass
        if self.uid is not None:
            if not (in_pid_namespace and exited_by_itself):
                kill_uid(self.uid)
            self.recipe.uids.release(self.uid)
            self.uid = None
        if self.status_r >= 0:
            os.close(self.status_r)
            self.status_r = -1
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class _WarmPool:
    """Up to `size` children started ahead of the calls of one sandbox, refilled by a daemon thread.

    The thread spawns outside the lock (Popen returns after exec; the interpreter start-up then runs on its own).
    `take` hands each child out once. The pool holds no reference to its sandbox, so the sandbox can be collected
    and its finalizer can close the pool.
    """

    def __init__(self, size: int):
        self.size, self.hits, self.misses = size, 0, 0
        self._idle: deque[_Child] = deque()
        self._recipe: _Recipe | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        _POOLS.add(self)

    def fill(self, recipe: _Recipe) -> list[_Child]:
        """Aim the pool at `recipe` and wake the refiller; returns children of another recipe to close (lock held)."""
        stale = []
        if recipe != self._recipe:
            stale, self._idle, self._recipe = list(self._idle), deque(), recipe
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill, name="arpo-sandbox-warm", daemon=True)
            self._thread.start()
        self._cond.notify()
        return stale

    def start(self, recipe: _Recipe) -> None:
        if self.size:
            with self._cond:
                stale = [] if self._closed else self.fill(recipe)
            for child in stale:
                child.close()

    def take(self, recipe: _Recipe) -> _Child | None:
        """A started, still living child of `recipe`, or None (pool empty, closed or of size 0)."""
        if not self.size:
            return None
        child, stale = None, []
        with self._cond:
            if not self._closed:
                stale = self.fill(recipe)
                while self._idle and child is None:
                    candidate = self._idle.popleft()
                    if candidate.alive():
                        child = candidate
                    else:
                        stale.append(candidate)
            if child is None:
                self.misses += 1
            else:
                self.hits += 1
        for dead in stale:
            dead.close()
        return child

    def idle_pids(self) -> list[int]:
        with self._cond:
            return [child.proc.pid for child in self._idle]

    def _refill(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._closed and len(self._idle) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                recipe = self._recipe
            try:
                child = recipe.start()
            except Exception:  # noqa: BLE001 - no free uid, no fds...: calls start their own child and say why
                failures += 1
                time.sleep(min(1.0, 0.01 * 2 ** failures))
                continue
            failures = 0
            with self._cond:
                keep = not self._closed and recipe == self._recipe and len(self._idle) < self.size
                if keep:
                    self._idle.append(child)
            if not keep:
                child.close()

    def close(self) -> None:
        """Stop the refiller and kill the idle children; for good (later `take`s return None)."""
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        for child in idle:
            child.close()

    def forget_after_fork(self) -> None:
        """In a forked copy of the host: the idle children belong to the parent. Point their stdin write ends at
        /dev/null, so that the copy does not keep them waiting once the parent is gone, and never touch them again."""
        self._cond, self._closed, self._thread = threading.Condition(), True, None
        devnull = os.open(os.devnull, os.O_WRONLY)
        for child in self._idle:
            try:
                os.dup2(devnull, child.proc.stdin.fileno())
            except (OSError, ValueError):
                pass
        os.close(devnull)
        self._idle = deque()


_POOLS: "weakref.WeakSet[_WarmPool]" = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    for pool in list(_POOLS):
        pool.forget_after_fork()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
