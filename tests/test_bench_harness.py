"""The benchmark harness's timing rules (no GPU needed: the CUDA sync is stubbed; the clock is fake, so that
the results do not depend on how loaded the machine is)."""
import types

import pytest

from arpo.bench import harness


@pytest.fixture
def clock(monkeypatch):
    """The harness's perf_counter, advanced only by the timed calls (`clock.now`, seconds)."""
    fake = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: fake.now))
    return fake


def _counting(clock, seconds: float):
    def fn():
        fn.calls += 1
        clock.now += seconds
    fn.calls = 0
    return fn


def test_cpu_calls_are_timed_one_by_one(clock):
    fn = _counting(clock, 0.0005)
    ms = harness.time_ms(fn, "cpu", warmup=2, reps=5)
    assert fn.calls == 2 + 5
    assert ms == pytest.approx(0.5)


def test_short_cuda_calls_are_queued_between_syncs(monkeypatch, clock):
    syncs = []
    monkeypatch.setattr(harness, "_sync", lambda device: syncs.append(device))
    fast = _counting(clock, 0.0002)
    ms = harness.time_ms(fast, "cuda", warmup=1, reps=3)
    queued = (fast.calls - 2) // 3  # after the warm-up call and the one probe call
    assert queued > 1 and fast.calls == 2 + 3 * queued
    assert len(syncs) == 2 + 3  # after warm-up, after the probe, once per sample: not once per call
    assert queued == 10 and ms == pytest.approx(0.2)  # 2 ms of calls per sample; the time is per call

    slow = _counting(clock, harness.GPU_SAMPLE_MS / 1000 * 1.5)
    harness.time_ms(slow, "cuda", warmup=1, reps=3)
    assert slow.calls == 1 + 1 + 3  # long enough alone: one call per sample
