"""Paged decode attention and trajectory forking, providers side by side (workloads: arpo/bench/paged_attention.py).

    pytest benchmarks/bench_paged_attention.py --benchmark-only
        [--benchmark-json=benchmarks/results/paged_attention.json]
"""
import pytest

from arpo.bench import paged_attention as workload
from arpo.bench.harness import bench_settings, pytest_benchmark_case

DEVICE, QUICK = bench_settings()
CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_paged_attention(benchmark, case, provider):
    pytest_benchmark_case(benchmark, PROVIDERS, case, provider, DEVICE, rounds=5)
