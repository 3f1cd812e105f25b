"""Tree-packed vs duplicated-row training, and the segmented loss kernel vs its reference (see
arpo/bench/policy_loss.py for the workloads)."""
import pytest

from arpo.bench import policy_loss as workload
from arpo.bench.harness import bench_settings, peak_extra_mb

DEVICE, QUICK = bench_settings()

CASES = workload.cases(DEVICE, QUICK)
PROVIDERS = workload.providers(DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_policy_loss(benchmark, case, provider):
    fn = PROVIDERS[provider](case)
    if fn is None:
        pytest.skip(f"{provider} does not apply to {case.label}")
    benchmark.group = case.label
    benchmark.extra_info.update(case.extra())
    benchmark.extra_info["peak_extra_mb"] = peak_extra_mb(fn, DEVICE)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
