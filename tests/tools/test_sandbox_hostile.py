"""Hostile snippets against PythonSandbox: each fails cleanly within its limit + 2 s, the host is unharmed, and a
normal call right after works. Small limits keep the suite fast (2 s wall clock, 256 MB)."""
import os
import signal
import socket
import threading
import time

import pytest

from arpo.tools import PythonSandbox

TIMEOUT = 2.0


def _sandbox(**kw):
    return PythonSandbox(timeout_s=TIMEOUT, memory_mb=256, max_output_chars=2000, **kw)


@pytest.fixture(scope="module")
def sandbox():
    return _sandbox()


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Things outside the sandbox that hostile code targets."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "vdir").mkdir()
    (tmp_path / "vdir" / "f").write_text("x")
    monkeypatch.setenv("ARPO_SECRET_TOKEN", "hunter2-secret")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    yield {"pid": os.getpid(), "tmp": str(tmp_path), "victim": str(victim), "vdir": str(tmp_path / "vdir"),
           "port": server.getsockname()[1], "server": server}
    server.close()


def _procs_with_cmdline(needle: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


HOSTILE = {
    "infinite_loop": ("while True:\n    pass", "time limit"),
    "sleep_forever": ("import time\ntime.sleep(100)", "time limit"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", ""),
    "memory_bomb": ("x = bytearray(4 * 1024 ** 3)", "memory limit"),
    "memory_growth": ("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))", "memory limit"),
    "huge_output": ("print('x' * 10 ** 7)", "output exceeded"),
    "endless_output": ("while True:\n    print('spam' * 1000)", ""),
    "deep_recursion": ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    "stack_overflow": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)", ""),
    "write_outside": ("open({tmp!r} + '/pwned.txt', 'w').write('pwned')", "Permission"),
    "delete_outside": ("import os\nos.remove({victim!r})", "Permission"),
    "rmtree_outside": ("import shutil\nshutil.rmtree({vdir!r})", "Permission"),
    "read_env": ("import os\nprint(os.environ['ARPO_SECRET_TOKEN'])", "KeyError"),
    "read_parent_environ": ("print(open('/proc/{pid}/environ').read())", ""),
    "socket_localhost": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
                         "s.sendall(b'hello')", ""),
    "kill_parent": ("import os, signal\nos.kill({pid}, signal.SIGKILL)", ""),
    "killpg_parent": ("import os, signal\nos.killpg(os.getpgid({pid}), signal.SIGKILL)", ""),
    "os_exit": ("import os\nprint('bye')\nos._exit(0)", "abruptly"),
    "ignore_signals": ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
                       "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass", ""),
    "subprocess_sleep": ("import subprocess\nsubprocess.run(['sleep', '4241'])", "time limit"),
    "orphan_escapes_session": ("import subprocess\nsubprocess.Popen(['sleep', '4242'], start_new_session=True)\n"
                               "raise SystemExit(3)", "status 3"),
    "thread_never_ends": ("import threading, time\nthreading.Thread(target=lambda: time.sleep(1000)).start()",
                          "time limit"),
    "binary_garbage": ("import sys\nsys.stdout.buffer.write(bytes(range(256)) * 50)", "binary"),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)", "segmentation"),
    "file_size_bomb": ("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (64 * 1024 * 1024))", ""),
    "sys_exit_nonzero": ("import sys\nsys.exit(5)", "status 5"),
    "syntax_error": ("def (:", "SyntaxError"),
    "read_stdin": ("input()", "EOFError"),
}


def _check(sandbox, name, host):
    code, expect = HOSTILE[name]
    start = time.perf_counter()
    res = sandbox.run(code.format(**host))
    elapsed = time.perf_counter() - start
    assert res.ok is False, (name, res.text)
    assert res.error and res.text, name
    if expect:
        assert expect in res.text, (name, res.text)
    assert elapsed < TIMEOUT + 30.0, (name, elapsed)  # bounded (generously: a loaded machine), not hung
    # the host is unharmed
    assert "hunter2" not in res.text
    assert open(host["victim"]).read() == "keep me"
    assert os.path.exists(os.path.join(host["vdir"], "f"))
    assert not os.path.exists(os.path.join(host["tmp"], "pwned.txt"))
    with pytest.raises(socket.timeout):
        host["server"].accept()
    # and the next call works
    assert sandbox.run("print(6 * 7)").text == "42"
    return res


def _gone(cmdline: str, within_s: float = 30.0) -> bool:
    """Whether no process with `cmdline` is left, waiting up to `within_s` for the sandbox's cleanup to finish
    (a kill is asynchronous; the wait is only long on a loaded machine)."""
    deadline = time.monotonic() + within_s
    while _procs_with_cmdline(cmdline):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_snippet(sandbox, host, name):
    _check(sandbox, name, host)
    if name == "orphan_escapes_session":
        assert _gone("4242"), "a process escaped the sandbox"
    if name == "subprocess_sleep":
        assert _gone("4241")


# the fallback path (no namespaces: audit hooks, subreaper cleanup) on the most dangerous snippets
@pytest.mark.parametrize("name", ["socket_localhost", "kill_parent", "write_outside", "delete_outside",
                                  "read_parent_environ", "fork_bomb", "orphan_escapes_session", "infinite_loop"])
def test_hostile_without_namespaces(host, name):
    res = _check(_sandbox(namespaces=False), name, host)
    assert "net=0 pid=0" in res.meta["isolation"]
    if name == "orphan_escapes_session":
        assert _gone("4242")


def test_many_hostile_calls_at_once(sandbox, host):
    """Concurrent calls: a fork bomb and a memory bomb do not disturb the plain calls next to them."""
    codes = [HOSTILE["fork_bomb"][0], HOSTILE["memory_growth"][0]] + [f"print({i} * 3)" for i in range(6)]
    results = [None] * len(codes)

    def work(i):
        results[i] = sandbox.run(codes[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(codes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT + 120)
    assert not results[0].ok and not results[1].ok
    assert [r.text for r in results[2:]] == [str(i * 3) for i in range(6)]
    assert signal.getsignal(signal.SIGTERM) is not None  # still here
