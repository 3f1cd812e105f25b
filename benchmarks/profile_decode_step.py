"""Where a GPU decode step's time goes: host work vs device work, for the engine at batch 64.

    python benchmarks/profile_decode_step.py [--batch 64] [--new 128] [--hf]

Prints the engine's wall time per step, the device time of one captured step replayed alone (CUDA events:
forward, lm_head and sampler), and cProfile's top host functions over one `generate`. The gap between the step
time and the device time is host overhead (scheduling, tensor staging, launches, the per-step sync).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from arpo.bench import decode as workload


def _events_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="also time HF generate on the same case")
    args = ap.parse_args()
    case = next(c for c in workload.cases("cuda", quick=False) if c.kind == "batch" and c.batch == args.batch)
    case.new_tokens = args.new
    run = workload._engine_provider(case)
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    print(f"{torch.cuda.get_device_name()}: engine batch {case.batch} x {case.new_tokens} new: "
          f"{wall * 1e3:.0f} ms, {wall / case.new_tokens * 1e3:.2f} ms/step (all {[round(w, 3) for w in walls]})")

    from arpo.engine.cuda_graph import _buckets
    graphs = run.engine.runner.graphs
    bs = next(b for b in _buckets(256) if b >= case.batch)
    if graphs is not None and bs in graphs.graphs:
        step = _events_ms(graphs.graphs[bs].replay)
        print(f"device time of one captured step (forward, lm_head, sampler): {step:.3f} ms")
    if args.hf:
        hf_run = workload._hf_provider(case)
        hf_run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf_run()
        torch.cuda.synchronize()
        hf = time.perf_counter() - t
        print(f"HF generate: {hf * 1e3:.0f} ms -> engine speed-up {hf / wall:.2f}x")
    prof = cProfile.Profile()
    prof.enable()
    run()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(28)
    stats.sort_stats("cumulative").print_stats(r"arpo", 25)


if __name__ == "__main__":
    main()
