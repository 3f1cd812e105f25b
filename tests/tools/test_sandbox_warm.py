"""PythonSandbox's warm pool: pre-started children give the same results as per-call ones, each serves one call,
they belong to one configuration, and nothing of theirs (process, uid, working directory) outlives close() or the
host."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arpo.tools import PythonSandbox
from arpo.tools.sandbox import _uid_pool

ROOT = os.geteuid() == 0
UID_BASE = 1_900_008_192  # a uid range of its own, so other sandboxes in this process do not blur the checks


@pytest.fixture
def private_tmp(monkeypatch):
    """Workdirs go to a fresh directory (world-searchable, as /tmp is), so counting them is exact."""
    path = tempfile.mkdtemp(prefix="arpo-warm-test-")
    os.chmod(path, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    os.rmdir(path)


def _wait_idle(sandbox, n, timeout=120.0):  # generous: children start slowly on a loaded machine
    deadline = time.monotonic() + timeout
    while len(sandbox.warm_stats["idle_pids"]) < n:
        assert time.monotonic() < deadline, f"pool did not reach {n} idle children: {sandbox.warm_stats}"
        time.sleep(0.01)
    return sandbox.warm_stats["idle_pids"]


def _is_bootstrap(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"_sandbox_child" in f.read()
    except OSError:
        return False


def _processes_with_uid_in(lo, hi):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if lo <= uid < hi:
                found.append(int(entry))
    return found


SNIPPETS = {
    "ok": "x = 6\nprint('x is', x)\nx * 7",
    "exception": "def f():\n    return 1 / 0\nf()",
    "exit_code": "import sys\nprint('bye')\nsys.exit(4)",
    "timeout": "while True:\n    pass",
    "limits": "import resource\nprint([resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU,"
              " resource.RLIMIT_FSIZE)])",
}


def test_results_match_per_call_start():
    kw = dict(timeout_s=3.0, memory_mb=256, uid_base=UID_BASE)  # the other snippets finish well within it
    with PythonSandbox(prestart=0, **kw) as cold, PythonSandbox(prestart=2, **kw) as warm:
        _wait_idle(warm, 2)
        for name, code in SNIPPETS.items():
            a, b = cold.run(code), warm.run(code)
            assert a.meta["isolation"] == b.meta["isolation"], name
            if name == "timeout":
                # the outcome, not which limit won: the wall-clock kill or the CPU rlimit fires first depending on
                # the machine's load, and each has its own message and return code
                assert not a.ok and not b.ok and a.error and b.error, name
                assert a.meta["returncode"] != 0 and b.meta["returncode"] != 0, name
                assert all("time limit" in f"{r.text} {r.error}" for r in (a, b)), (name, a.text, b.text)
            else:
                assert (a.text, a.ok, a.error) == (b.text, b.ok, b.error), name
                assert a.meta["returncode"] == b.meta["returncode"], name
            assert a.meta["warm"] is False and b.meta["warm"] is True, name
            _wait_idle(warm, 2)
        assert cold.warm_stats["hits"] == 0 and warm.warm_stats["hits"] == len(SNIPPETS)


def test_each_child_serves_exactly_one_call():
    with PythonSandbox(prestart=2, uid_base=UID_BASE) as sandbox:
        used, dirs = [], []
        for _ in range(4):
            first = _wait_idle(sandbox, 2)[0]
            res = sandbox.run("import os\nprint(os.path.exists('mark'))\nopen('mark', 'w').write('1')\nos.getcwd()")
            seen, cwd = res.text.split("\n")
            assert res.ok and res.meta["warm"] and seen == "False"
            assert first not in sandbox.warm_stats["idle_pids"] and not _is_bootstrap(first)
            used.append(first)
            dirs.append(cwd)
            assert not os.path.exists(cwd.strip("'"))
        assert len(set(used)) == 4 and len(set(dirs)) == 4
        assert sandbox.warm_stats["hits"] == 4


def test_children_belong_to_one_configuration():
    with PythonSandbox(prestart=1, memory_mb=256, uid_base=UID_BASE) as a, \
            PythonSandbox(prestart=1, memory_mb=384, uid_base=UID_BASE) as b:
        b_idle = _wait_idle(b, 1)
        _wait_idle(a, 1)
        code = "import resource\nresource.getrlimit(resource.RLIMIT_AS)[0] >> 20"
        assert a.run(code).text == "256" and b.warm_stats["idle_pids"] == b_idle
        stale = _wait_idle(a, 1)
        a.memory_mb = 512  # children started with the old limit must not serve the new configuration
        res = a.run(code)
        assert res.text == "512" and res.meta["warm"] is False and not _is_bootstrap(stale[0])


def test_concurrent_calls_and_nothing_left_after_close(private_tmp):
    base = UID_BASE + 4096  # not shared with the tests running in the other worker
    sandbox = PythonSandbox(prestart=3, uid_base=base)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: sandbox.run(f"print({i} * 7)"), range(16)))
    assert [r.text for r in results] == [str(i * 7) for i in range(16)] and all(r.ok for r in results)
    stats = sandbox.warm_stats
    assert stats["hits"] + stats["misses"] == 16 and stats["hits"] >= 1
    idle = _wait_idle(sandbox, 3)
    assert len(os.listdir(private_tmp)) == 3  # only the idle children's workdirs
    sandbox.close()
    assert sandbox.warm_stats["idle_pids"] == [] and not any(_is_bootstrap(pid) for pid in idle)
    assert os.listdir(private_tmp) == []
    if ROOT:
        assert not _uid_pool(base)._held
        assert _processes_with_uid_in(base, base + 4096) == []
    # still usable after close: one child per call, and the pool does not come back
    res = sandbox.run("print('after')")
    assert res.text == "after" and res.meta["warm"] is False
    assert sandbox.warm_stats["idle_pids"] == [] and os.listdir(private_tmp) == []


def test_garbage_collection_closes_the_pool(private_tmp):
    sandbox = PythonSandbox(prestart=2, uid_base=UID_BASE)
    idle = _wait_idle(sandbox, 2)
    del sandbox
    assert not any(_is_bootstrap(pid) for pid in idle) and os.listdir(private_tmp) == []


HOST = textwrap.dedent("""
    import json, os, signal, sys, time
    from arpo.tools import PythonSandbox
    sandbox = PythonSandbox(prestart=2, uid_base={uid_base})
    while len(sandbox.warm_stats["idle_pids"]) < 2:
        time.sleep(0.01)
    time.sleep(0.5)  # let them reach stdin.read()
    children = [(c.proc.pid, c.workdir) for c in sandbox._pool._idle]
    copy = os.fork() if {fork} else 0  # a fork without exec (multiprocessing, DataLoader) inherits every fd
    if copy == 0 and {fork}:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # let the test read the host's output to its end
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        time.sleep(30)
        os._exit(0)
    print(json.dumps({{"children": children, "copy": copy}}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("fork", [False, True])
def test_idle_children_die_with_the_host(fork):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", HOST.format(uid_base=UID_BASE, fork=fork)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    info = json.loads(proc.stdout)
    try:
        deadline = time.monotonic() + 60  # generous: the kernel reaps them asynchronously
        while any(_is_bootstrap(pid) or os.path.exists(wd) for pid, wd in info["children"]):
            assert time.monotonic() < deadline, f"idle children outlived their host: {info}"
            time.sleep(0.02)
    finally:
        if info["copy"]:
            os.kill(info["copy"], signal.SIGKILL)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_prestart_is_validated(bad):
    with pytest.raises(ValueError, match=r"prestart must be an int >= 0"):
        PythonSandbox(prestart=bad)
