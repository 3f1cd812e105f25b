"""ARPO (soft), ARPO (hard), GRPO (and DAPO where `algo=dapo` exists) on the agent task, from one cold start.

The paper's comparison, on `arpo/configs/embedded-agent.yaml` (issue 19): the cold start is trained once
(`arpo sft`, the config's train.seed) and copied into every run directory, so each RL phase starts from the same
weights and skips the SFT; every algorithm gets the same config — the same M (rollout.leaves), N, steps, lr —
and only `algo.*` differs; each runs with the same seeds (train.seed = the rollout and data-order seed).

    python3 benchmarks/agent_compare.py --out runs/agent_compare                  # 3 seeds, default algos
    python3 benchmarks/agent_compare.py --seeds 0 1 --jobs 3 --cold-start runs/embedded-agent/sft_model
    python3 benchmarks/agent_compare.py --algos arpo-soft grpo --extra train.steps=20

With `--jobs J`, the runs of one seed go J at a time (all algorithms of a seed together when J >= their number),
so that each seed's algorithms share the machine's load and their wall times stay comparable to each other.

Reported per run, and as the mean over seeds per algorithm (results.md, results.json):
held-out greedy accuracy before RL (the cold start) and after; `calls/leaf` = tool calls on each leaf's path
(training rollouts, mean over steps); `exec/leaf` = tool calls actually executed per leaf (a branch after a
result shares its parent's); `tool execs` = tool calls executed over the whole run; `branch` = branches per
executed tool call (mean over steps); `tokens` = tokens trained on over the run (tree-packed, unique); `eval
calls` = tool calls per held-out question after RL; `wall` = seconds of the RL process. Plots:
accuracy_vs_tool_executions.png (held-out accuracy at each eval against the tool calls executed so far — the
paper's "half the tool-call budget" is about this axis) and accuracy_vs_wall_time.png (against seconds since the
first evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "arpo", "configs", "embedded-agent.yaml")
ALGOS = {  # name -> the overrides that select it (nothing else differs between runs)
    "arpo-soft": ["algo.name=arpo", "algo.attribution=soft"],
    "arpo-hard": ["algo.name=arpo", "algo.attribution=hard"],
    "grpo": ["algo.name=grpo"],
    "dapo": ["algo.name=dapo"],
}


def available_algos() -> list[str]:
    """The ALGOS this checkout can run: dapo only where AlgoConfig accepts algo.name=dapo."""
    sys.path.insert(0, ROOT)
    from arpo.algo.config import AlgoConfig

    names = typing.get_args(typing.get_type_hints(AlgoConfig)["name"])
    return [a for a in ALGOS if a != "dapo" or "dapo" in names]


def arpo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "arpo", *args, "log.progress_bar=false"]


def cold_start(config: str, out: str, extra: list[str]) -> str:
    """`out/cold_start/sft_model`, trained once by `arpo sft` (reused when it is already there)."""
    run_dir = os.path.join(out, "cold_start")
    model = os.path.join(run_dir, "sft_model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        os.makedirs(run_dir, exist_ok=True)
        t0 = time.perf_counter()
        with open(os.path.join(out, "cold_start.log"), "w", encoding="utf-8") as log:
            subprocess.run(arpo_cmd("sft", config, f"train.run_dir={run_dir}", *extra), check=True, cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT)
        print(f"cold start: {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: list[dict]) -> dict:
    """The run's numbers from its metrics.jsonl (see the module docstring), plus the eval curve."""
    train = [r for r in rows if r.get("tool_calls_per_leaf") is not None]
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    if not train or not evals:
        raise RuntimeError("metrics.jsonl has no training steps or no evaluation")
    mean = lambda key: sum(r[key] for r in train) / len(train)  # noqa: E731
    execs, curve, t0 = 0.0, [], evals[0]["time"]
    for r in rows:  # in step order; an eval row after step s counts the tool calls of steps 1..s
        if r.get("tool_calls_per_leaf") is not None:
            execs += r["tool_executions_per_leaf"] * r["leaves"]
        if r.get("eval/accuracy") is not None:
            curve.append({"step": r["step"], "accuracy": r["eval/accuracy"], "tool_executions": execs,
                          "seconds": r["time"] - t0})
    return {"start": evals[0]["eval/accuracy"], "end": evals[-1]["eval/accuracy"],
            "calls_per_leaf": mean("tool_calls_per_leaf"), "exec_per_leaf": mean("tool_executions_per_leaf"),
            "tool_executions": execs, "branch_rate": mean("branch_rate"),
            "tokens": sum(r["packed_tokens"] for r in train), "eval_tool_calls": evals[-1]["eval/tool_calls"],
            "curve": curve}


def run(algo: str, seed: int, config: str, out: str, start_model: str, extra: list[str]) -> dict:
    """One RL run of `algo` with `seed`, starting from a copy of `start_model`."""
    run_dir = os.path.join(out, f"{algo}_s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    shutil.copytree(start_model, os.path.join(run_dir, "sft_model"))
    cmd = arpo_cmd("train", config, *ALGOS[algo], f"train.seed={seed}", f"train.run_dir={run_dir}", *extra)
    t0 = time.perf_counter()
    with open(f"{run_dir}.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    res = {"algo": algo, "seed": seed, "run_dir": run_dir, "wall_s": time.perf_counter() - t0,
           **summarize(read_metrics(run_dir))}
    print(f"{algo} seed {seed}: held-out {100 * res['start']:.1f}% -> {100 * res['end']:.1f}%, "
          f"{res['tool_executions']:.0f} tool executions, {res['wall_s']:.0f} s", flush=True)
    return res


COLUMNS = [("after SFT", "start", "pct"), ("after RL", "end", "pct"), ("calls/leaf", "calls_per_leaf", "f2"),
           ("exec/leaf", "exec_per_leaf", "f2"), ("tool execs", "tool_executions", "f0"),
           ("branch", "branch_rate", "pct"), ("tokens", "tokens", "f0"), ("eval calls", "eval_tool_calls", "f2"),
           ("wall s", "wall_s", "f0")]
_FMT = {"pct": lambda x: f"{100 * x:.1f}", "f2": lambda x: f"{x:.2f}", "f0": lambda x: f"{x:.0f}"}


def table(results: list[dict], algos: list[str]) -> str:
    """Markdown: one row per run, then the mean over seeds per algorithm."""
    head = "| algo | seed | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for r in sorted(results, key=lambda r: (algos.index(r["algo"]), r["seed"])):
        lines.append(f"| {r['algo']} | {r['seed']} | " + " | ".join(_FMT[f](r[k]) for _, k, f in COLUMNS) + " |")
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        if rs:
            cells = [_FMT[f](sum(r[k] for r in rs) / len(rs)) for _, k, f in COLUMNS]
            lines.append(f"| **{algo}** | mean of {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], algos: list[str], out: str) -> list[str]:
    """Held-out accuracy against tool executions and against wall time, one line per run, a colour per algo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("tool_executions", "tool calls executed (cumulative)", "accuracy_vs_tool_executions"),
                             ("seconds", "wall time since the first evaluation (s)", "accuracy_vs_wall_time")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, algo in enumerate(algos):
            for j, r in enumerate(r for r in results if r["algo"] == algo):
                ax.plot([p[key] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], marker="o",
                        ms=3, color=f"C{i}", alpha=0.8, label=algo if j == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%, greedy)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, f"{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="the run config every algorithm uses")
    ap.add_argument("--algos", nargs="+", default=None, help=f"of {', '.join(ALGOS)} (default: all this "
                    "checkout supports; dapo needs algo.name=dapo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/agent_compare", help="parent of the run directories")
    ap.add_argument("--cold-start", default=None, help="an existing SFT model directory to start every run from "
                    "(default: train one with `arpo sft` into OUT/cold_start)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, grouped by seed")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides for every run (and the cold start)")
    args = ap.parse_args(argv)
    supported = available_algos()
    algos = args.algos or supported
    bad = [a for a in algos if a not in supported]
    if bad:
        ap.error(f"algorithm(s) {', '.join(bad)} not available here (have {', '.join(supported)})")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    config = os.path.abspath(args.config)
    start = os.path.abspath(args.cold_start) if args.cold_start else cold_start(config, out, args.extra)
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for seed in args.seeds:  # a seed's runs together, so they share one stretch of the machine's load
            results += pool.map(lambda a: run(a, seed, config, out, start, args.extra), algos)
            with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
                json.dump({"config": config, "cold_start": start, "extra": args.extra, "runs": results}, f,
                          indent=1)
    md = table(results, algos)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    print(md)
    try:
        print("plots:", ", ".join(plot(results, algos, out)))
    except ImportError as exc:
        print(f"(no plots: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
