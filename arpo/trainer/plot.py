"""`arpo plot RUN_DIR [RUN_DIR ...]`: training curves as PNGs, from the runs' metrics.jsonl.

One PNG per metric (reward, accuracy, held-out accuracy, entropy, tool calls per leaf, branch rate, tokens/s,
loss, time per step) plus `overview.png` with the main ones side by side. Each curve is drawn raw (thin) and
smoothed (thick, an exponential moving average whose span grows with the run's length); held-out accuracy, logged
only every few steps, is drawn as points joined by lines. Several run directories are overlaid, one colour per
run (e.g. ARPO vs GRPO on the same task). Uses matplotlib's Agg backend, so it works without a display.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from arpo.trainer.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    key: str  # metric name in metrics.jsonl
    file: str  # PNG name
    title: str
    ylabel: str
    percent: bool = False  # values are fractions, shown as %
    sparse: bool = False  # logged every few steps: points, no smoothing


PANELS = (
    Panel("reward", "reward", "Mean reward per leaf", "reward"),
    Panel("accuracy", "accuracy", "Training accuracy (leaves with the right answer)", "accuracy (%)", percent=True),
    Panel("eval/accuracy", "eval_accuracy", "Held-out accuracy", "accuracy (%)", percent=True, sparse=True),
    Panel("tool_calls_per_leaf", "tool_calls", "Tool calls per leaf", "calls"),
    Panel("entropy", "entropy", "Policy entropy of sampled tokens", "nats / token"),
    Panel("branch_rate", "branch_rate", "Branch rate after tool calls", "branches / tool call"),
    Panel("tokens_per_s", "tokens_per_s", "Rollout throughput", "tokens / s"),
    Panel("loss", "loss", "Policy loss", "loss"),
    Panel("grad_norm", "grad_norm", "Gradient norm (before clipping)", "global L2 norm"),
)
OVERVIEW = ("reward", "accuracy", "eval/accuracy", "tool_calls_per_leaf", "entropy", "branch_rate")
TIME_KEYS = (("time/rollout", "rollout"), ("time/tools", "tools"), ("time/update", "update"))


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("arpo plot needs matplotlib: pip install matplotlib (or pip install 'arpo[plot]')") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step; a step logged twice keeps its last value."""
    by_step = {}
    for row in rows:
        if row.get(key) is not None and "step" in row:
            by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average, debiased at the start; span defaults to ~5% of the points."""
    if span is None:
        span = max(1, len(values) // 20)
    a = 2.0 / (span + 1.0)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = (1 - a) * avg + a * v
        norm = (1 - a) * norm + a
        out.append(avg / norm)
    return out


def _label(run_dir: str) -> str:
    """The run's directory name, plus its algorithm when config.yaml names one the name does not mention."""
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        try:
            import yaml

            with open(path, encoding="utf-8") as f:
                algo = ((yaml.safe_load(f) or {}).get("algo") or {}).get("name")
            if algo and algo.lower() not in name.lower():
                name = f"{name} ({algo})"
        except Exception:  # noqa: BLE001 - a label is not worth failing a plot over
            pass
    return name


def _draw(ax, panel: Panel, runs: list[tuple[str, list[dict]]], colors) -> bool:
    drawn = False
    for (label, rows), color in zip(runs, colors):
        steps, values = _series(rows, panel.key)
        if not steps:
            continue
        if panel.percent:
            values = [100 * v for v in values]
        if panel.sparse or len(values) < 5:
            last = values[-1]
            line_kw = dict(marker="o", ms=5)
        else:
            ax.plot(steps, values, color=color, lw=0.8, alpha=0.35)
            values = smooth(values)
            last, line_kw = values[-1], {}
        if len(runs) > 1:  # several runs: the final value goes in the legend, labels would collide
            ax.plot(steps, values, color=color, lw=2.2, label=f"{label}: {last:.3g}", **line_kw)
        else:
            ax.plot(steps, values, color=color, lw=2.2, **line_kw)
            ax.annotate(f"{last:.3g}", (steps[-1], last), textcoords="offset points", xytext=(5, 0),
                        fontsize=9, color=color, va="center")
            ax.margins(x=0.08)
        drawn = True
    if drawn:
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8, frameon=False)
    return drawn


def _draw_time(ax, rows: list[dict]) -> bool:
    """Stacked seconds per step spent in rollout / tools / update (single run)."""
    series = [(_series(rows, key), name) for key, name in TIME_KEYS]
    series = [(s, name) for s, name in series if s[0]]
    if not series:
        return False
    steps = series[0][0][0]
    stacks = [[dict(zip(*s)).get(t, 0.0) for t in steps] for s, _ in series]
    ax.stackplot(steps, *stacks, labels=[name for _, name in series], alpha=0.8)
    ax.set_ylim(0, 1.3 * max(map(sum, zip(*stacks))) or 1.0)  # headroom for the legend
    ax.set_title("Seconds per step, by phase", fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left", ncol=len(series))
    return True


def plot_run(run_dirs: str | list[str], out_dir: str | None = None, labels: list[str] | None = None) -> list[str]:
    """Write PNG curves for one run dir (or overlay several); returns the PNG paths.

    out_dir defaults to `<run_dir>/plots` (the first run's `plots/compare` when overlaying several).
    Metrics a run never logged are skipped; a run without metrics.jsonl is an error.
    """
    dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    if not dirs:
        raise ValueError("plot_run: no run directory given")
    runs = []
    for i, d in enumerate(dirs):
        rows = read_metrics(d)
        if not rows:
            raise FileNotFoundError(f"{d}: no metrics.jsonl with data (is it a run directory?)")
        runs.append((labels[i] if labels else _label(d), rows))
    if out_dir is None:
        out_dir = os.path.join(dirs[0], "plots", "compare") if len(dirs) > 1 else os.path.join(dirs[0], "plots")
    os.makedirs(out_dir, exist_ok=True)
    plt = _import_pyplot()
    colors = plt.get_cmap("tab10").colors
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(7, 4))
        if _draw(ax, panel, runs, colors):
            save(fig, panel.file)
        else:
            plt.close(fig)
    if len(runs) == 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        if _draw_time(ax, runs[0][1]):
            save(fig, "time")
        else:
            plt.close(fig)
    present = [p for p in PANELS if p.key in OVERVIEW and any(_series(rows, p.key)[0] for _, rows in runs)]
    if present:
        cols = min(3, len(present))
        nrows = -(-len(present) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, panel in zip(axes.flat, present):
            _draw(ax, panel, runs, colors)
        for ax in list(axes.flat)[len(present):]:
            ax.set_visible(False)
        fig.suptitle(" vs ".join(label for label, _ in runs) + "  (thin: raw, thick: smoothed)", fontsize=12)
        save(fig, "overview")
    return written
