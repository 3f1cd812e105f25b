"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/run.json`.

Each suite parametrises over the same workloads and providers as `arpo bench`, with one benchmark group per
workload so providers sit side by side; peak extra memory goes into each result's `extra_info`. Device and
shape set come from `arpo.bench.harness.bench_settings` (ARPO_BENCH_FULL=1 for the full set).
"""
