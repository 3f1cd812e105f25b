"""Time and peak-memory measurement shared by every benchmark.

Peak memory is the *extra* memory a call needs above what already exists when it starts: on CUDA from the caching
allocator's peak statistics, on Linux CPUs from the process's resident-set high-water mark (reset through
/proc/self/clear_refs before each measured call). Times are medians of repeated calls after warm-up, with the
device synchronised. On CUDA a call shorter than `GPU_SAMPLE_MS` is timed as a queue of calls between two
synchronisations (per-call time = total / count): a lone call with a sync after it measures the launch and sync
latency (~0.1-0.2 ms from Python) rather than the kernel, which in the engine runs inside a CUDA graph.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Result:
    workload: str
    provider: str
    ms: float
    peak_mb: float | None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def bench_settings() -> tuple[str, bool]:
    """(device, quick) for the pytest-benchmark suites: CUDA when present; quick unless ARPO_BENCH_FULL=1."""
    device = os.environ.get("ARPO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, os.environ.get("ARPO_BENCH_FULL", "0") != "1"


def machine_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _malloc_for_memory(on: bool) -> None:
    """glibc tuning per measurement. Memory: large blocks are mmapped and returned at once (and the heap trimmed
    first), so that RSS tracks live memory. Timing: large thresholds, so that freed blocks are reused — with a
    128 KiB mmap threshold every mid-size tensor is a fresh mmap whose pages fault in again, which slowed
    allocation-heavy code (a decode step) by up to 2x and distorted the comparisons."""
    if _LIBC is None:
        return
    try:
        if on:
            _LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
            _LIBC.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
            _LIBC.malloc_trim(0)
        else:
            _LIBC.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's ceiling for its dynamic threshold
            _LIBC.mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    except AttributeError:
        pass


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory (MiB) allocated by one call of `fn` beyond what was live before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    _malloc_for_memory(True)
    try:
        if not _reset_cpu_peak():
            return None
        base = _read_status_kb("VmRSS")
        out = fn()
        peak = _read_status_kb("VmHWM")
        del out
    finally:
        _malloc_for_memory(False)
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


GPU_SAMPLE_MS = 2.0
_MAX_QUEUED = 500


def time_ms(fn: Callable[[], object], device: str, warmup: int = 2, reps: int = 5) -> float:
    _malloc_for_memory(False)
    for _ in range(warmup):
        fn()
    _sync(device)
    queued = 1
    if device.startswith("cuda"):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        single = (time.perf_counter() - t0) * 1e3
        queued = 1 if single >= GPU_SAMPLE_MS else min(_MAX_QUEUED, math.ceil(GPU_SAMPLE_MS / max(single, 1e-3)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(queued):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / queued)
    return statistics.median(samples)


def measure(workload: str, provider: str, fn: Callable[[], object], device: str, warmup: int = 2, reps: int = 5,
            **extra) -> Result:
    ms = time_ms(fn, device, warmup, reps)
    peak = peak_extra_mb(fn, device)
    return Result(workload, provider, ms, peak, dict(extra))


def format_table(results: list[Result], baseline: str) -> str:
    """Rows grouped by workload; ratios are against `baseline` measured in the same run."""
    lines = [f"{'workload':44s} {'provider':22s} {'ms':>10s} {'speed vs ' + baseline:>16s} {'peak MiB':>10s} "
             f"{'mem ratio':>10s} {'GB/s':>8s}"]
    by_workload: dict[str, list[Result]] = {}
    for r in results:
        by_workload.setdefault(r.workload, []).append(r)
    for workload, rows in by_workload.items():
        base = next((r for r in rows if r.provider == baseline), None)
        for r in rows:
            speed = f"{base.ms / r.ms:.2f}x" if base and r.ms > 0 else "-"
            mem = "-"
            if base and base.peak_mb and r.peak_mb is not None:
                mem = f"{r.peak_mb / base.peak_mb:.3f}"
            peak = f"{r.peak_mb:.1f}" if r.peak_mb is not None else "n/a"
            gbps = f"{r.extra['bytes_read'] / r.ms / 1e6:.0f}" if "bytes_read" in r.extra and r.ms > 0 else ""
            lines.append(f"{workload:44s} {r.provider:22s} {r.ms:10.3f} {speed:>16s} {peak:>10s} {mem:>10s} {gbps:>8s}")
    return "\n".join(lines)


def pytest_benchmark_case(benchmark, providers: dict, case, provider: str, device: str, rounds: int = 3) -> None:
    """Body shared by the pytest-benchmark suites: one provider on one workload, grouped by workload label."""
    import pytest

    fn = providers[provider](case)
    if fn is None:
        pytest.skip(f"{provider} does not apply to {case.label}")
    try:
        benchmark.group = case.label
        benchmark.extra_info.update(case.extra())
        benchmark.extra_info["peak_extra_mb"] = peak_extra_mb(fn, device)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        benchmark.extra_info.update(getattr(fn, "extra", {}))  # after timing: a provider may summarise its passes
    finally:
        if getattr(fn, "close", None) is not None:  # a provider holding a resource (a server process)
            fn.close()
    if "bytes_read" in case.extra():
        benchmark.extra_info["GB/s"] = case.extra()["bytes_read"] / benchmark.stats.stats.median / 1e9
