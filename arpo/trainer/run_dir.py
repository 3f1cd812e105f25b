"""One run per run directory: a new run never writes into a directory that holds another run's files.

What torchrun, Lightning and the Hugging Face Trainer users expect: starting a run in a used directory is an
error that says how to go on — continue it (`--resume`), pick another directory (`train.run_dir=...`), or
`--overwrite` it, which first removes every file an earlier run wrote there (and nothing else). Without this
rule a forgotten `--resume` truncated the old metrics and left its later checkpoints next to the new ones, so a
later `--resume` mixed two runs.

A directory is "used" by RL training when it holds metrics.jsonl, a checkpoint (step_*) or summary.json; by
`arpo sft` when it holds the SFT metrics (sft/) or the SFT model. The embedded base model and the SFT cold start
(base_model/, sft_model/, sft/) are inputs that a fresh RL run in the same directory reuses, so they alone do
not make the directory used for `arpo train` (`arpo sft` then `arpo train` is the documented cold start).

Under torchrun the decision is taken once, on rank 0, before any rank writes (`claim_run_dir` broadcasts it).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from arpo.settings import ConfigError

# what RL training writes (arpo.trainer.trainer / metrics / checkpoint / plot)
RL_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "summary.json", "config.yaml", "wandb_id.txt")
RL_DIRS = ("tensorboard", "plots")
# the cold start (arpo.build.embedded_base_dir, arpo sft, the trainer's own cold start)
SFT_DIR, SFT_MODEL_DIR, BASE_MODEL_DIR = "sft", "sft_model", "base_model"


class RunDirInUse(ConfigError):
    """The run directory holds another run; the message names the ways on."""


def rl_run_files(run_dir: str) -> list[str]:
    """The entries of `run_dir` that show an RL run was there (sorted names)."""
    if not os.path.isdir(run_dir):
        return []
    from arpo.trainer.checkpoint import STEP_DIR

    return sorted(n for n in os.listdir(run_dir)
                  if n in ("metrics.jsonl", "summary.json") or STEP_DIR.match(n))


def sft_run_files(run_dir: str, out: str) -> list[str]:
    """What shows an earlier `arpo sft` wrote into `run_dir` (its metrics) or `out` (its model)."""
    found = []
    if os.path.isdir(os.path.join(run_dir, SFT_DIR)):
        found.append(os.path.join(run_dir, SFT_DIR))
    if os.path.exists(out):
        found.append(out)
    return found


def _refusal(what: str, run_dir: str, found: list[str], resume_hint: bool) -> RunDirInUse:
    shown = ", ".join(os.path.basename(f.rstrip("/")) for f in found[:4]) + (" ..." if len(found) > 4 else "")
    ways = (["continue it with --resume"] if resume_hint else []) + [
        "start elsewhere with train.run_dir=NEW_DIR", "or replace it with --overwrite (deletes the earlier run's "
        "files first)"]
    return RunDirInUse(f"{run_dir} already holds {what} ({shown}); {', '.join(ways)}")


def remove_rl_run(run_dir: str) -> list[str]:
    """Delete everything an arpo run wrote into `run_dir` (RL and cold start); other files stay. Returns them."""
    if not os.path.isdir(run_dir):
        return []
    from arpo.trainer.checkpoint import STEP_DIR, TMP_PREFIX

    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        ours_dir = name in RL_DIRS + (SFT_DIR, SFT_MODEL_DIR, BASE_MODEL_DIR) or STEP_DIR.match(name) \
            or name.startswith(TMP_PREFIX) or name.startswith(SFT_MODEL_DIR + ".tmp-")
        if os.path.isdir(path) and not os.path.islink(path) and ours_dir:
            shutil.rmtree(path)
        elif name in RL_FILES:
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def check_train_run_dir(run_dir: str, *, resume: str | None, resuming: bool, overwrite: bool) -> list[str]:
    """Apply the rule for an RL run: resuming a checkpoint continues the directory; a fresh run needs an unused
    directory, or `overwrite` (which removes the earlier run first; returns what it removed). `resume`: what was
    asked (train.resume), `resuming`: whether it found a checkpoint. Raises RunDirInUse."""
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    if resuming:
        return []
    found = rl_run_files(run_dir)
    if not found:
        return []
    if resume is not None:
        raise RunDirInUse(f"{run_dir}: nothing to resume (no valid checkpoint) but it holds an earlier run's files "
                          f"({', '.join(found[:4])}); start elsewhere with train.run_dir=NEW_DIR, or replace it "
                          "with --overwrite (without --resume)")
    if not overwrite:
        raise _refusal("an earlier run", run_dir, found, resume_hint=True)
    return remove_rl_run(run_dir)


def check_sft_run_dir(run_dir: str, out: str, *, overwrite: bool) -> None:
    """The same rule for `arpo sft`: its metrics (RUN_DIR/sft) and its model (`out`) must not exist, unless
    `overwrite`, which removes both first."""
    found = sft_run_files(run_dir, out)
    if found and not overwrite:
        raise _refusal("an earlier SFT run", run_dir, found, resume_hint=False)
    for path in found:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def on_rank0(decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0 only, its result — or its error, re-raised — the same on every rank: all ranks go on
    or all fail alike, and no rank writes before rank 0 decided. One process: just `decide()`."""
    from arpo.trainer import distributed as D

    if not D.is_initialized():
        return decide()
    from arpo.trainer.dist_checkpoint import broadcast_object

    outcome: tuple = ("ok", None)
    if D.is_main():
        try:
            outcome = ("ok", decide())
        except Exception as exc:  # re-raised on every rank below
            outcome = ("error", (type(exc), str(exc)))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        kind, message = outcome[1]
        try:
            error = kind(message)
        except Exception:
            error = RuntimeError(message)
        raise error
    return outcome[1]
