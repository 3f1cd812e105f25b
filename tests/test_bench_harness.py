"""The benchmark harness's timing rules (no GPU needed: the CUDA sync is stubbed)."""
import time

from arpo.bench import harness


def _counting(sleep_s: float):
    def fn():
        fn.calls += 1
        time.sleep(sleep_s)
    fn.calls = 0
    return fn


def test_cpu_calls_are_timed_one_by_one():
    fn = _counting(0.0005)
    ms = harness.time_ms(fn, "cpu", warmup=2, reps=5)
    assert fn.calls == 2 + 5
    assert 0.5 <= ms < 50


def test_short_cuda_calls_are_queued_between_syncs(monkeypatch):
    syncs = []
    monkeypatch.setattr(harness, "_sync", lambda device: syncs.append(device))
    fast = _counting(0.0002)
    ms = harness.time_ms(fast, "cuda", warmup=1, reps=3)
    queued = (fast.calls - 2) // 3  # after the warm-up call and the one probe call
    assert queued > 1 and fast.calls == 2 + 3 * queued
    assert len(syncs) == 2 + 3  # after warm-up, after the probe, once per sample: not once per call
    assert 0.2 <= ms < harness.GPU_SAMPLE_MS  # per call, not per sample

    slow = _counting(harness.GPU_SAMPLE_MS / 1000 * 1.5)
    harness.time_ms(slow, "cuda", warmup=1, reps=3)
    assert slow.calls == 1 + 1 + 3  # long enough alone: one call per sample
