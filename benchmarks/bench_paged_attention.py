"""Paged decode attention and trajectory forking, providers side by side (workloads: arpo/bench/paged_attention.py).

    pytest benchmarks/bench_paged_attention.py --benchmark-only [--benchmark-json=benchmarks/results/paged.json]
"""
import pytest

from arpo.bench import paged_attention as workload
from arpo.bench.harness import bench_settings, peak_extra_mb

DEVICE, QUICK = bench_settings()

CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_paged_attention(benchmark, case, provider):
    fn = PROVIDERS[provider](case)
    if fn is None:
        pytest.skip(f"{provider} does not apply to {case.label}")
    benchmark.group = case.label
    benchmark.extra_info.update(case.extra())
    benchmark.extra_info["peak_extra_mb"] = peak_extra_mb(fn, DEVICE)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    if "bytes_read" in case.extra():
        benchmark.extra_info["GB/s"] = case.extra()["bytes_read"] / benchmark.stats.stats.median / 1e9
