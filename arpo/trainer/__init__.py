"""The training loop's supporting pieces: atomic checkpoints, metrics sinks and plots.

`arpo.trainer.plot` is not imported here: it needs matplotlib, which only `arpo plot` requires.
"""
from arpo.trainer.checkpoint import (Checkpoint, CheckpointError, capture_rng, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, resolve_resume, restore_rng, save_checkpoint,
                                     verify_checkpoint)
from arpo.trainer.metrics import MetricsLogger, progress_postfix, read_metrics, truncate_metrics

__all__ = ["Checkpoint", "CheckpointError", "capture_rng", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "resolve_resume", "restore_rng", "save_checkpoint", "verify_checkpoint", "MetricsLogger", "progress_postfix",
           "read_metrics", "truncate_metrics"]
