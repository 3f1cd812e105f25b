"""benchmarks/device_check.sh: the prepared GPU call parses, names a bad phase, and runs a phase on the CPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


@pytest.mark.parametrize("name", ["device_check.sh", "device_wheels.sh"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", name)], check=True)


def _run(tmp_path, *phases):
    # as from a shell: without the suite's TRITON_INTERPRET (the benchmarks would time the interpreter)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ARPO_KERNEL_BACKEND")}
    env.update(OUT=str(tmp_path), ARPO_CHECK_DEVICE="cpu", PYTHON=sys.executable, LIMIT_ENV="200", LIMIT_TREE="400")
    return subprocess.run(["bash", SCRIPT, *phases], env=env, capture_output=True, text=True, timeout=900)


def test_unknown_phase_is_named(tmp_path):
    r = _run(tmp_path, "bogus")
    assert r.returncode == 2 and "unknown phase 'bogus'" in r.stdout


def test_a_benchmark_phase_writes_its_json_on_the_cpu(tmp_path):
    r = _run(tmp_path, "env", "tree")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "env: rc=0" in r.stdout and "tree_attention: rc=0" in r.stdout
    assert (tmp_path / "tree_attention.json").stat().st_size > 0 and (tmp_path / "check.log").exists()
