"""Per-step metrics: one JSON line per call in `run_dir/metrics.jsonl`, mirrored to TensorBoard and W&B if asked.

The JSONL file is the record that `arpo plot` reads and that a resumed run must continue seamlessly: a resume
from step s drops every line after s (those steps are about to be recomputed), a fresh run starts an empty file.
Each line is `{"step": s, "time": unix seconds, <metric>: number, ...}`, flushed as soon as it is written.
Non-finite numbers become null (strict JSON). TensorBoard (`torch.utils.tensorboard`) and W&B are optional: asked
for but not importable → one warning, and the run continues.

Metric names the plots know (see arpo/trainer/plot.py): reward, accuracy and eval/accuracy (fractions in [0, 1]),
entropy, tool_calls_per_leaf, branch_rate, tokens_per_s, loss, grad_norm, and seconds per step split into
time/rollout (decoding, excluding tool waits), time/tools and time/update, which the plot stacks. Anything else
numeric (leaves, lr, ...) is logged too.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> float | int | None:
    """A plain Python number from int/float/bool/numpy/0-d tensor; None/NaN/inf → None; else ValueError."""
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"metric value {value!r} is not a number")


def read_metrics(run_dir: str) -> list[dict]:
    """The lines of `run_dir/metrics.jsonl` (a torn last line, from a killed run, is ignored)."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn; stop there
    return rows


def truncate_metrics(run_dir: str, last_step: int | None) -> int:
    """Keep only lines with step <= last_step (None: none) — rewritten atomically. Returns lines kept."""
    path = os.path.join(run_dir, METRICS_FILE)
    keep = [] if last_step is None else [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    if not os.path.exists(path) and not keep:
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in keep:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(keep)


class MetricsLogger:
    """`log(step, metrics)` to metrics.jsonl (+ TensorBoard, + W&B). Use as a context manager or call `close()`.

    resume_step: None for a fresh run (the file starts empty); s when resuming from the checkpoint of step s
    (lines after s are dropped; TensorBoard purges events after s; W&B resumes the run id saved in run_dir).
    """

    def __init__(self, run_dir: str, *, resume_step: int | None = None, tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str = "arpo", wandb_run_name: str | None = None,
                 config: dict | None = None):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        truncate_metrics(run_dir, resume_step)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = self._open_tensorboard(resume_step) if tensorboard else None
        self.wandb = self._open_wandb(wandb_project, wandb_run_name, config, resume_step) if wandb else None

    def _open_tensorboard(self, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the `tensorboard` package
            warnings.warn(f"log.tensorboard: TensorBoard is not available ({exc}); pip install tensorboard",
                          stacklevel=3)
            return None
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"), purge_step=purge)

    def _open_wandb(self, project: str, name: str | None, config: dict | None, resume_step: int | None):
        try:
            import wandb
        except ImportError:
            warnings.warn("log.wandb: wandb is not installed; pip install wandb (continuing without it)", stacklevel=3)
            return None
        id_path = os.path.join(self.run_dir, "wandb_id.txt")
        run_id = None
        if resume_step is not None and os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        run = wandb.init(project=project, name=name or os.path.basename(os.path.abspath(self.run_dir)),
                         config=config, dir=self.run_dir, id=run_id, resume="allow" if run_id else None)
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(str(getattr(run, "id", "") or ""))
        return run

    def log(self, step: int, metrics: dict) -> dict:
        """Write one line for `step`; returns the row as written."""
        row = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if key in ("step", "time"):
                raise ValueError(f"metric name {key!r} is reserved")
            row[key] = _number(value)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in row.items() if k not in ("step", "time") and v is not None}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, global_step=row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar over steps, or None when disabled or tqdm is missing (callers then print lines)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def _si(value: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.1f}{suffix}"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def progress_postfix(metrics: dict) -> str:
    """A short progress-bar postfix: `reward=0.42 acc=35.0% tools=1.1 tok/s=12.3k` (absent metrics left out)."""
    parts = []
    if metrics.get("reward") is not None:
        parts.append(f"reward={metrics['reward']:.3f}")
    if metrics.get("accuracy") is not None:
        parts.append(f"acc={100 * metrics['accuracy']:.1f}%")
    if metrics.get("eval/accuracy") is not None:
        parts.append(f"eval={100 * metrics['eval/accuracy']:.1f}%")
    if metrics.get("tool_calls_per_leaf") is not None:
        parts.append(f"tools={metrics['tool_calls_per_leaf']:.2f}")
    if metrics.get("tokens_per_s") is not None:
        parts.append(f"tok/s={_si(metrics['tokens_per_s'])}")
    return " ".join(parts)
