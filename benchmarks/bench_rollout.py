"""ARPO tree rollout vs re-prefill tree vs trajectory rollout (workloads: arpo/bench/rollout.py).

    pytest benchmarks/bench_rollout.py --benchmark-only [--benchmark-json=benchmarks/results/rollout.json]
"""
import pytest

from arpo.bench import rollout as workload
from arpo.bench.harness import bench_settings

DEVICE, QUICK = bench_settings()

CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_rollout(benchmark, case, provider):
    fn = PROVIDERS[provider](case)
    benchmark.group = case.label
    benchmark.extra_info.update(case.extra())
    benchmark.extra_info.update(fn.extra)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("case", CASES[:1], ids=[c.label for c in CASES[:1]])
def test_fork_and_reprefill_build_the_same_trees(case):
    assert workload.same_trees(case)
