"""PythonSandbox on well-behaved code: REPL-style output, errors, isolation details."""
import os

import pytest

from arpo.tools import PythonSandbox


@pytest.fixture(scope="module")
def sandbox():
    return PythonSandbox(timeout_s=5, memory_mb=512, max_output_chars=300)


def test_prints_and_last_expression(sandbox):
    res = sandbox.run("x = 6\nprint('x is', x)\nx * 7")
    assert res.ok and res.text == "x is 6\n42" and res.latency_s > 0 and not res.error


def test_last_expression_none_is_silent_and_fence_is_stripped(sandbox):
    assert sandbox.run("```python\nprint(3)\nNone\n```").text == "3"


def test_exception_gives_traceback_without_bootstrap_frames(sandbox):
    res = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert not res.ok and "ZeroDivisionError" in res.text and "_sandbox_child" not in res.text
    assert 'File "<code>", line 2' in res.text


def test_stderr_is_reported_with_stdout(sandbox):
    res = sandbox.run("import sys\nprint('out')\nprint('warn', file=sys.stderr)")
    assert res.ok and res.text == "out\nwarn"


def test_output_is_truncated(sandbox):
    res = sandbox.run("print('a' * 5000)")
    assert res.ok and len(res.text) <= 300 and "truncated" in res.text


def test_private_workdir_is_writable_and_removed(sandbox):
    res = sandbox.run("import os\nopen('f.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('f.txt').read())")
    workdir, content = res.text.split("\n")
    assert res.ok and content == "hi" and not os.path.exists(workdir)


def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("ARPO_SECRET_TOKEN", "hunter2")
    res = sandbox.run("import os\nsorted(os.environ)")
    assert res.ok and "ARPO_SECRET_TOKEN" not in res.text and "'PATH'" in res.text


def test_each_call_is_a_fresh_process(sandbox):
    sandbox.run("import builtins\nbuiltins.leak = 1")
    assert not sandbox.run("import builtins\nprint(builtins.leak)").ok


def test_isolation_is_reported(sandbox):
    meta = sandbox.run("1").meta
    assert meta["isolation"].startswith("net=") and meta["returncode"] == 0
    if os.geteuid() == 0:
        assert "uid=1" in meta["isolation"]


def test_bad_limits_raise():
    with pytest.raises(ValueError, match="positive"):
        PythonSandbox(timeout_s=0)


def test_uid_hunt_only_where_no_pid_namespace_reaped_the_call(monkeypatch):
    """A call whose bootstrap ran it in a PID namespace and exited by itself leaves nothing behind (the namespace's
    init took everything with it), so the /proc hunt for its uid is skipped; without namespaces it still runs."""
    import arpo.tools._sandbox_pool as pool

    hunts = []
    monkeypatch.setattr(pool, "kill_uid", lambda uid, rounds=50: hunts.append(uid) or 0)
    isolated = PythonSandbox(timeout_s=5, prestart=0)
    res = isolated.run("print(1)")
    if os.geteuid() != 0 or "pid=1" not in res.meta["isolation"] or "uid=1" not in res.meta["isolation"]:
        pytest.skip("needs root with PID namespaces (uid switching)")
    assert res.ok and hunts == []
    plain = PythonSandbox(timeout_s=5, prestart=0, namespaces=False)
    assert plain.run("print(2)").text == "2" and len(hunts) == 1
