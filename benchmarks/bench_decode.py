"""Engine vs Hugging Face generate (workloads: arpo/bench/decode.py).

    pytest benchmarks/bench_decode.py --benchmark-only [--benchmark-json=benchmarks/results/decode.json]
"""
import pytest

from arpo.bench import decode as workload
from arpo.bench.harness import bench_settings, pytest_benchmark_case

DEVICE, QUICK = bench_settings()
CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_decode(benchmark, case, provider):
    pytest_benchmark_case(benchmark, PROVIDERS, case, provider, DEVICE, rounds=2)
