"""Tree-packed vs duplicated-row training, and the segmented loss kernel vs its reference (see
arpo/bench/policy_loss.py for the workloads).

    pytest benchmarks/bench_policy_loss.py --benchmark-only [--benchmark-json=benchmarks/results/policy_loss.json]
"""
import pytest

from arpo.bench import policy_loss as workload
from arpo.bench.harness import bench_settings, pytest_benchmark_case

DEVICE, QUICK = bench_settings()
CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_policy_loss(benchmark, case, provider):
    pytest_benchmark_case(benchmark, PROVIDERS, case, provider, DEVICE, rounds=3)
