"""Benchmarks shared by `arpo bench` (a table for people) and `benchmarks/` (pytest-benchmark suites).

Each workload module defines `DOC`, `cases(device, quick)` and `providers(device)`; `harness` measures time and
peak extra memory the same way for every provider so that ratios are meaningful.
"""
