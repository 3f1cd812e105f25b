"""ARPO vs GRPO on the embedded task over several seeds: the README's results table.

For each seed it runs `arpo train` (ARPO, the embedded default) and then `arpo train algo=grpo` starting from the
same cold start (the ARPO run's `sft_model` is copied into the GRPO run directory first, so both RL phases start
from identical weights and the GRPO run skips the SFT). Runs go one after another unless `--jobs 2`; wall times
are only comparable with the budget (≤ 10 minutes per `arpo train` on 2 cores) when nothing else runs.

    python3 benchmarks/embedded_seeds.py --out /tmp/emb            # seeds 0 1 2, prints the markdown table
    python3 benchmarks/embedded_seeds.py --seeds 1 --extra train.steps=10

Columns: greedy held-out accuracy after SFT and after RL; `calls/leaf` = tool calls on each leaf's path
(training rollouts, mean over steps); `exec/leaf` = tool calls actually executed per leaf (the trainer's
`tool_executions_per_leaf`; for older runs estimated as calls/leaf ÷ (1 + branch rate)) — a branch after a tool
result inherits its parent's call instead of running one;
wall = seconds of the whole `arpo train` process (the ARPO run's includes the SFT, the GRPO run's does not).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def run(algo: str, seed: int, out: str, extra: list[str]) -> dict:
    run_dir = os.path.join(out, f"{algo}_s{seed}")
    cmd = [sys.executable, "-m", "arpo", "train", f"algo={algo}", f"train.seed={seed}", f"train.run_dir={run_dir}",
           "log.progress_bar=false", *extra]
    t0 = time.perf_counter()
    with open(f"{run_dir}.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    train = [r for r in rows if r.get("tool_calls_per_leaf") is not None]
    tpl = sum(r["tool_calls_per_leaf"] for r in train) / max(len(train), 1)
    execd = sum(r["tool_executions_per_leaf"] if "tool_executions_per_leaf" in r  # logged since session 2
                else r["tool_calls_per_leaf"] / (1.0 + (r.get("branch_rate") or 0.0))
                for r in train) / max(len(train), 1)
    return {"algo": algo, "seed": seed, "run_dir": run_dir, "wall_s": wall,
            "start": summary["eval_start"]["eval/accuracy"], "end": summary["eval_end"]["eval/accuracy"],
            "calls_per_leaf": tpl, "exec_per_leaf": execd, "sft_steps": (summary.get("sft") or {}).get("steps")}


def seed_pair(seed: int, out: str, extra: list[str]) -> tuple[dict, dict]:
    arpo = run("arpo", seed, out, extra)
    grpo_dir = os.path.join(out, f"grpo_s{seed}")
    shutil.rmtree(grpo_dir, ignore_errors=True)
    os.makedirs(grpo_dir)
    shutil.copytree(os.path.join(arpo["run_dir"], "sft_model"), os.path.join(grpo_dir, "sft_model"))
    return arpo, run("grpo", seed, out, extra)


def table(pairs: list[tuple[dict, dict]]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["| seed | after SFT | ARPO | GRPO | calls/leaf ARPO / GRPO | exec/leaf ARPO / GRPO | wall s ARPO / GRPO |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a, g in pairs:
        lines.append(f"| {a['seed']} | {pct(a['start'])} | {pct(a['end'])} ({100 * (a['end'] - a['start']):+.1f}) | "
                     f"{pct(g['end'])} ({100 * (g['end'] - g['start']):+.1f}) | "
                     f"{a['calls_per_leaf']:.2f} / {g['calls_per_leaf']:.2f} | "
                     f"{a['exec_per_leaf']:.2f} / {g['exec_per_leaf']:.2f} | {a['wall_s']:.0f} / {g['wall_s']:.0f} |")
    n = max(len(pairs), 1)
    mean = lambda algo, key: sum(p[algo][key] for p in pairs) / n  # noqa: E731
    s, ae, ge = mean(0, "start"), mean(0, "end"), mean(1, "end")
    lines.append(f"| mean | {pct(s)} | {pct(ae)} ({100 * (ae - s):+.1f}) | {pct(ge)} ({100 * (ge - s):+.1f}) | "
                 f"{mean(0, 'calls_per_leaf'):.2f} / {mean(1, 'calls_per_leaf'):.2f} | "
                 f"{mean(0, 'exec_per_leaf'):.2f} / {mean(1, 'exec_per_leaf'):.2f} | "
                 f"{mean(0, 'wall_s'):.0f} / {mean(1, 'wall_s'):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/embedded_seeds", help="parent of the run directories")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run concurrently (wall times then overlap)")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides for every run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pairs = list(pool.map(lambda s: seed_pair(s, args.out, args.extra), args.seeds))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump([list(p) for p in pairs], f, indent=1)
    print(table(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
