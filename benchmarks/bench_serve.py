"""`arpo serve` vs offline generate: throughput, TTFT, inter-token latency (workloads: arpo/bench/serve.py).

    pytest benchmarks/bench_serve.py --benchmark-only [--benchmark-json=benchmarks/results/serve.json]

The latency percentiles and requests/s of each case are in each result's `extra_info`.
"""
import pytest

from arpo.bench import serve as workload
from arpo.bench.harness import bench_settings, pytest_benchmark_case

DEVICE, QUICK = bench_settings()
CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_serve(benchmark, case, provider):
    pytest_benchmark_case(benchmark, PROVIDERS, case, provider, DEVICE, rounds=2)
