"""Bootstrap that runs one untrusted Python snippet; executed as a script by `arpo.tools.sandbox`.

Why a separate script instead of `preexec_fn`: the host runs many sandboxes from a thread pool, and Python code
between fork and exec is unsafe in a multi-threaded parent. This file starts in a fresh single-threaded
interpreter, so it can take its time to lock itself down before the snippet runs:

1. try to enter new network and PID namespaces (root, or an unprivileged user namespace where permitted);
2. fork the snippet process; in a PID namespace a small init in between reaps orphans and, by exiting, makes the
   kernel kill everything the snippet left behind; otherwise this process is a child subreaper and kills and reaps
   the leftovers itself;
3. in the snippet process: resource limits, drop to a throw-away uid when started as root, parent-death signal,
   audit hooks for what the kernel could not enforce (sockets without a network namespace; writes outside the
   working directory, signals to foreign pids and reads of /proc/*/environ without a uid switch);
4. run the code like a REPL cell (the last bare expression is printed) and report how it ended on the status fd.

argv: status_fd, JSON config. stdin: one JSON line of per-call settings (`{"nproc": n}`), then the code. Status
lines: `iso net=0|1 pid=0|1 uid=0|1`, then one of `ok`, `exc <ExceptionType>`, `exit <code>`, `signal <n>`.

The host may start this script long before it has code for it (a warm pool), so nothing call-specific happens
before stdin is read. While it waits the process is not dumpable: a snippet of another call running as the same
user cannot open its stdin through /proc/<pid>/fd and slip code in. EOF before any byte means the host closed
the pool or died: the bootstrap removes the working directory made for it and exits quietly.
"""
import ast
import ctypes
import json
import os
import resource
import signal
import sys
import threading
import traceback

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER = 1, 4, 8, 36
CAP_DAC_READ_SEARCH, _CAP_VERSION_3 = 2, 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


def _status(fd: int, line: str) -> None:
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:
        pass


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _enter_namespaces(enabled: bool) -> tuple[bool, bool]:
    if not enabled:
        return False, False
    if os.geteuid() != 0 and not _unshare(CLONE_NEWUSER):
        return False, False
    return _unshare(CLONE_NEWNET), _unshare(CLONE_NEWPID)


def _die_with_parent() -> None:
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(137)


def _wait_code(status: int, fd: int) -> int:
    if os.WIFSIGNALED(status):
        _status(fd, f"signal {os.WTERMSIG(status)}")
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _kill_adopted_orphans() -> None:
    """As subreaper: kill and reap everything the snippet left behind until no child remains."""
    me = os.getpid()
    for _ in range(1000):
        for pid in _children_of(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return


def _limit(cfg: dict) -> None:
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = cfg["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"],) * 2)


def _drop_privileges(cfg: dict) -> bool:
    uid = cfg.get("uid")
    if uid is None or os.geteuid() != 0:
        return False
    os.setgroups([])
    os.setgid(uid)
    keep = cfg.get("keep_read_search", False)
    if keep:
        _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setuid(uid)
    if keep:  # the interpreter lives where only root may look (e.g. under /root): keep read/search, nothing else
        header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0, 0)
        if _libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    return True


def _install_audit_hook(cwd: str, guard_files: bool, guard_net: bool, guard_signals: bool) -> None:
    own_pgid = os.getpgid(0)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == cwd or real.startswith(cwd + os.sep) or real == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if guard_net and event.startswith("socket.") and event != "socket.gethostname":
            raise PermissionError("network access is disabled in the sandbox")
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            path = os.fsdecode(args[0])
            if path.startswith("/proc/") and path.endswith("/environ") and not path.startswith("/proc/self/"):
                raise PermissionError("reading other processes' environment is not allowed in the sandbox")
            if guard_files:
                mode, flags = args[1] or "r", args[2] or 0
                writing = any(c in str(mode) for c in "wax+") or flags & write_flags
                if writing and not inside(path):
                    raise PermissionError(f"writing outside the sandbox directory is not allowed: {path}")
        elif guard_files and event in ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
                                       "os.truncate", "os.symlink", "os.link", "shutil.rmtree", "os.utime"):
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"{event} outside the sandbox directory is not allowed: {path}")
        elif guard_signals and event == "os.kill":
            pid = args[0]
            if pid == -1 or (pid > 0 and _pgid_of(pid) != own_pgid) or pid < -1 and -pid != own_pgid:
                raise PermissionError(f"signalling pid {pid} is not allowed in the sandbox")
        elif guard_signals and event == "os.killpg" and args[0] != own_pgid:
            raise PermissionError(f"signalling process group {args[0]} is not allowed in the sandbox")

    sys.addaudithook(hook)


def _pgid_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _run_code(code: str) -> None:
    """Execute like a REPL cell: the last bare expression's repr is printed."""
    tree = ast.parse(code, filename="<code>", mode="exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(tree, "<code>", "exec"), scope)
    if last is not None:
        value = eval(compile(last, "<code>", "eval"), scope)
        if value is not None:
            print(repr(value))


def _snippet_process(cfg: dict, code: str, fd: int, isolated_net: bool) -> None:
    _limit(cfg)
    uid_switched = _drop_privileges(cfg)
    _die_with_parent()
    _install_audit_hook(os.getcwd(), guard_files=not uid_switched, guard_net=not isolated_net,
                        guard_signals=not uid_switched)
    try:
        _run_code(code)
        for thread in threading.enumerate():  # a script waits for its non-daemon threads; so do we
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        line, rc = "ok", 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        line = "ok" if rc == 0 else f"exit {rc}"
    except BaseException as exc:  # noqa: BLE001 - report everything the snippet raised
        tb = traceback.extract_tb(exc.__traceback__)
        user = [frame for frame in tb if frame.filename != __file__]
        sys.stderr.write("Traceback (most recent call last):\n" if user else "")
        sys.stderr.write("".join(traceback.format_list(user)))
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        line, rc = f"exc {type(exc).__name__}", 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    _status(fd, line)
    os._exit(rc)


def _supervise(cfg: dict, code: str, fd: int, isolated_net: bool) -> int:
    child = os.fork()
    if child == 0:
        _snippet_process(cfg, code, fd, isolated_net)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid == child:
            return _wait_code(status, fd)


def _add_site_packages() -> None:
    """Started with -S (site's .pth processing costs ~50 ms per call): put site-packages on the path directly."""
    import site

    for path in site.getsitepackages():
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)


def _wait_for_code(cfg: dict) -> str:
    """Block until the host sends the call (settings line, then code); merge the settings into `cfg`."""
    data = sys.stdin.read()
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if not data:  # the host went away before sending a call
        cwd = os.getcwd()
        if os.path.basename(cwd).startswith("arpo-sandbox-"):
            import shutil

            shutil.rmtree(cwd, ignore_errors=True)
        os._exit(0)
    settings, _, code = data.partition("\n")
    cfg.update(json.loads(settings))
    return code


def main() -> None:
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # until the code is in (see the module docstring)
    _add_site_packages()
    fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
    code = _wait_for_code(cfg)
    isolated_net, isolated_pid = _enter_namespaces(cfg["namespaces"])
    will_switch_uid = cfg.get("uid") is not None and os.geteuid() == 0
    _status(fd, f"iso net={int(isolated_net)} pid={int(isolated_pid)} uid={int(will_switch_uid)}")
    if isolated_pid:
        init = os.fork()  # becomes pid 1 of the new namespace; its exit kills every process left in it
        if init == 0:
            _die_with_parent()
            os._exit(_supervise(cfg, code, fd, isolated_net))
        _, status = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status))
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    rc = _supervise(cfg, code, fd, isolated_net)
    _kill_adopted_orphans()
    os._exit(rc)


if __name__ == "__main__":
    main()
