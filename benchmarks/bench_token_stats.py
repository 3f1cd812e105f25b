"""Per-token log-prob + entropy providers side by side (see arpo/bench/token_stats.py for the workloads).

    pytest benchmarks/bench_token_stats.py --benchmark-only [--benchmark-json=benchmarks/results/token_stats.json]
"""
import pytest

from arpo.bench import token_stats as workload
from arpo.bench.harness import bench_settings, pytest_benchmark_case

DEVICE, QUICK = bench_settings()
CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_token_stats(benchmark, case, provider):
    pytest_benchmark_case(benchmark, PROVIDERS, case, provider, DEVICE, rounds=3)
