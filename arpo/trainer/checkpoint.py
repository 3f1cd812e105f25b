"""Checkpoints that a crash can never half-write, and that let `--resume` continue exactly.

A checkpoint is a directory `run_dir/step_000123/` holding
  * the model in Hugging Face format (written by the caller's `save_model(dir)`, e.g. `model.save_pretrained`) and
    the tokenizer (`save_tokenizer(dir)`), so the directory loads directly with `from_pretrained`;
  * `optimizer.pt`: optimizer and lr-scheduler state dicts;
  * `rng_state.pt`: Python, NumPy, torch CPU and CUDA generator states;
  * `trainer_state.json`: step, metrics so far, config;
  * `manifest.json`: every other file's size and SHA-256 — written last, so a checkpoint whose files were later
    truncated or deleted (disk full, a killed copy) is recognised: `verify_checkpoint` names the bad file, and
    `latest_checkpoint` / `resolve_resume` skip such a checkpoint (with a warning) for the newest valid one.
Everything is written into a hidden temporary directory in the same parent, fsynced, then renamed into place,
so a `step_*` directory either is complete or does not exist. Old checkpoints beyond `keep_last` are renamed
away before they are deleted, for the same reason. Leftover temporary directories (a killed save) are swept on
the next save.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE, OPTIM_FILE, RNG_FILE = "trainer_state.json", "optimizer.pt", "rng_state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: with manifest.json (checkpoints of version 1 have none and are taken as they are)


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the checkpoint and the bad file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """Every global generator's state, as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of `capture_rng` (the CUDA part only when CUDA is present in both runs)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------- save
def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dir(run_dir: str, path: str) -> None:
    """Rename away, then delete: a killed delete leaves a hidden temporary dir, never a partial step_*."""
    doomed = os.path.join(run_dir, f"{TMP_PREFIX}del-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_temporary(run_dir: str) -> None:
    """Delete temporary dirs left by killed saves or deletes."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, *, save_model: Callable[[str], None] | None = None,
                    save_tokenizer: Callable[[str], None] | None = None, optimizer: Any = None,
                    scheduler: Any = None, state: dict | None = None, keep_last: int = 0) -> str:
    """Write `run_dir/step_{step:06d}` atomically and return its path; then keep only the newest `keep_last`.

    `state` (JSON-serialisable: metrics so far, config, ...) goes into trainer_state.json together with `step`.
    Saving a step that already exists replaces it. `keep_last` 0 keeps every checkpoint.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    os.makedirs(run_dir, exist_ok=True)
    sweep_temporary(run_dir)
    final = os.path.join(run_dir, step_dir_name(step))
    tmp = os.path.join(run_dir, f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        if save_model is not None:
            save_model(tmp)
        if save_tokenizer is not None:
            save_tokenizer(tmp)
        if optimizer is not None or scheduler is not None:
            torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                        "scheduler": scheduler.state_dict() if scheduler is not None else None},
                       os.path.join(tmp, OPTIM_FILE))
        torch.save(capture_rng(), os.path.join(tmp, RNG_FILE))
        payload = {"format_version": FORMAT_VERSION, **(state or {}), "step": step}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, allow_nan=False, default=_json_default)
        write_manifest(tmp)
        _fsync_tree(tmp)
        if os.path.exists(final):
            _remove_dir(run_dir, final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last and keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _remove_dir(run_dir, old)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, torch.Tensor)):
        return obj.item()
    raise TypeError(f"trainer state: {type(obj).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------------- manifest
def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: str) -> dict:
    """Record size and SHA-256 of every file under checkpoint dir `path` in its manifest.json (written last)."""
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))}
    with open(os.path.join(path, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def verify_checkpoint(path: str, checksums: bool = True) -> str | None:
    """None if checkpoint dir `path` is intact, else what is wrong, naming the file. Checks the manifest's sizes
    first (cheap: a truncated or missing file), then (`checksums`) the SHA-256s. A version-1 checkpoint has no
    manifest and is only checked for its trainer_state.json."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        return f"{state_path} is missing"
    try:
        with open(state_path, encoding="utf-8") as f:
            version = int(json.load(f).get("format_version", 1))
    except (OSError, ValueError) as exc:
        return f"{state_path} is unreadable ({exc})"
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing" if version >= 2 else None
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for rel, meta in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != meta["size"]:
            return f"{full} has {size} bytes, the manifest says {meta['size']} (truncated or replaced)"
    for rel, meta in files.items() if checksums else ():
        full = os.path.join(path, rel)
        if _sha256(full) != meta["sha256"]:
            return f"{full} does not match its checksum in {MANIFEST_FILE} (corrupted)"
    return None


def _warn(message: str) -> None:
    print(f"arpo: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- load
def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str, warn: Callable[[str], None] | None = _warn) -> str | None:
    """Path of the newest checkpoint in `run_dir` that passes `verify_checkpoint`, or None; each newer one that
    fails is skipped with `warn(message naming the bad file)`."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"skipping checkpoint {path}: {problem}")
    return None


@dataclass
class Checkpoint:
    """What `load_checkpoint` read. The model and tokenizer are loaded by the caller from `path`."""

    path: str
    step: int
    state: dict  # trainer_state.json
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict = field(default_factory=dict)

    def restore_rng(self) -> None:
        if self.rng:
            restore_rng(self.rng)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint directory (as written by `save_checkpoint`); errors name the missing file."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a checkpoint: {STATE_FILE} missing")
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    ckpt = Checkpoint(path=path, step=int(state["step"]), state=state)
    optim_path = os.path.join(path, OPTIM_FILE)
    if os.path.isfile(optim_path):
        blob = torch.load(optim_path, map_location=map_location, weights_only=True)
        ckpt.optimizer, ckpt.scheduler = blob.get("optimizer"), blob.get("scheduler")
    rng_path = os.path.join(path, RNG_FILE)
    if os.path.isfile(rng_path):
        ckpt.rng = torch.load(rng_path, map_location="cpu", weights_only=True)
    return ckpt


def resolve_resume(run_dir: str, resume: str | None, warn: Callable[[str], None] | None = _warn) -> str | None:
    """`train.resume` → a checkpoint path: None → None; 'latest' → the newest valid one in run_dir (None if there
    is none; bad ones are skipped with a warning); a path → itself if valid, else a CheckpointError naming the bad
    file."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir, warn)
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"train.resume={resume!r}: not a checkpoint directory ({STATE_FILE} missing)")
    problem = verify_checkpoint(resume)
    if problem is not None:
        raise CheckpointError(f"train.resume={resume!r}: bad checkpoint: {problem}")
    return resume
