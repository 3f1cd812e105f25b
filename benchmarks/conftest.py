"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/run.json`.

Each suite parametrises over the same workloads and providers as `arpo bench`, with one benchmark group per
workload so providers sit side by side. Peak extra memory goes into each result's `extra_info`. Set
ARPO_BENCH_FULL=1 for the full shape set (default: the quick set).
"""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("ARPO_BENCH_FULL", "0") != "1"


@pytest.fixture
def bench_device() -> str:
    return DEVICE
