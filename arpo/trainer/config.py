"""The trainer's own settings, declared once: optimiser, the RL loop, logging, the SFT cold start."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.data.config import DATA_EXTENSIONS
from arpo.settings import ConfigError, check_fields, check_files, opt


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = opt(1e-6, "peak learning rate", gt=0)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay", ge=0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas [beta1, beta2]")
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = opt(0, "linear warm-up steps from 0 to lr", ge=0)
    schedule: Literal["constant", "cosine"] = opt("constant", "learning rate after warm-up")
    min_lr_ratio: float = opt(0.0, "cosine: final lr as a fraction of lr", ge=0, le=1)
    grad_clip: Optional[float] = opt(1.0, "max global gradient norm; null = no clipping", gt=0)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "optim") -> "OptimConfig":
        check_fields(self, section)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{section}.betas={self.betas}: expected two numbers in [0, 1)")
        return self


@dataclass
class TrainConfig:
    """The RL loop, evaluation, checkpoints."""

    steps: int = opt(200, "policy-update steps (one rollout batch each)", gt=0)
    batch_prompts: int = opt(128, "prompts per rollout batch", gt=0)
    mini_batch_prompts: int = opt(16, "prompts per optimizer step (divides batch_prompts)", gt=0)
    micro_batch_tokens: int = opt(16384, "packed tokens per forward/backward pass (gradients accumulate over a "
                                  "mini-batch); lower it if memory runs out", gt=0)
    seed: int = opt(0, "seed of every random generator (data order, sampling, init)")
    bf16: bool = opt(True, "bfloat16 autocast for training on CUDA (ignored on CPU)")
    threads: int = opt(0, "torch CPU threads (0 = leave torch's default)", ge=0)
    eval_every: int = opt(0, "evaluate held-out accuracy every N steps and at the end (0 = only at the end)", ge=0)
    eval_temperature: float = opt(0.0, "sampling temperature for evaluation (0 = greedy)", ge=0)
    eval_samples: int = opt(1, "samples per held-out question (pass@k uses k = this)", gt=0)
    save_every: int = opt(50, "write a checkpoint every N steps and at the end (0 = only at the end)", ge=0)
    keep_last: int = opt(3, "checkpoints kept in run_dir (older step_* dirs are deleted; 0 = keep all)", ge=0)
    run_dir: str = opt("runs/arpo", "where checkpoints, metrics.jsonl, plots and config.yaml go")
    save_on_signal: bool = opt(True, "on SIGTERM / Ctrl-C: finish the step, write its checkpoint, then stop "
                               "(exit status 128 + signal)")
    resume: Optional[str] = opt(None, "null = start fresh; 'latest' = newest checkpoint in run_dir; or a "
                                "checkpoint directory")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "train") -> "TrainConfig":
        check_fields(self, section)
        if self.mini_batch_prompts > self.batch_prompts or self.batch_prompts % self.mini_batch_prompts:
            raise ConfigError(f"{section}.mini_batch_prompts={self.mini_batch_prompts} must divide "
                              f"{section}.batch_prompts={self.batch_prompts}")
        if not self.run_dir.strip():
            raise ConfigError(f"{section}.run_dir must not be empty")
        return self

    def eval_sampling(self, samples: int | None = None, temperature: float | None = None) -> tuple[int, float]:
        """(k, temperature) of a held-out evaluation, explicit values winning over eval_samples/eval_temperature;
        greedy decoding has one sample per question. Resolved here once for `arpo eval` and the trainer."""
        t = self.eval_temperature if temperature is None else float(temperature)
        return (1 if t == 0 else (samples or self.eval_samples)), t


@dataclass
class LogConfig:
    """Where metrics go besides run_dir/metrics.jsonl."""

    tensorboard: bool = opt(False, "write TensorBoard scalars to run_dir/tensorboard (needs tensorboard)")
    wandb: bool = opt(False, "log to Weights & Biases (needs wandb; skipped with a warning if missing)")
    wandb_project: str = opt("arpo", "W&B project")
    wandb_run_name: Optional[str] = opt(None, "W&B run name; null = the run directory's name")
    progress_bar: bool = opt(True, "show a progress bar with reward, accuracy and tokens/s")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "log") -> "LogConfig":
        check_fields(self, section)
        if not self.wandb_project.strip():
            raise ConfigError(f"{section}.wandb_project must not be empty")
        return self


@dataclass
class SftConfig:
    """Cold-start supervised fine-tuning on tool-use traces (loss on the model's own tokens only)."""

    steps: int = opt(0, "SFT steps before RL (0 = none)", ge=0)
    lr: float = opt(1e-5, "SFT learning rate (AdamW, optim.weight_decay and grad_clip apply)", gt=0)
    batch_size: int = opt(32, "traces per SFT step", gt=0)
    train_files: list[str] = opt([], "JSONL traces; empty = demonstrations of the embedded task")
    embedded_traces: Optional[int] = opt(None, "embedded task: demonstrations drawn for SFT (null = "
                                               "data.embedded_train_size, the RL questions). At least sft.steps x "
                                               "sft.batch_size means no trace is seen twice, so the cold start has "
                                               "to read the tool results instead of memorising answers", gt=0)
    max_tokens: int = opt(4096, "traces longer than this are truncated", gt=0)
    stop_loss: Optional[float] = opt(None, "stop SFT once the running loss (EMA over ~20 steps, after >= 50 steps) "
                                           "is below this; null = run all sft.steps", gt=0)
    stop_accuracy: Optional[float] = opt(None, "stop SFT once the running share of training traces that greedy "
                                               "decoding reproduces (teacher-forced argmax; EMA over ~20 steps, "
                                               "after >= 50 steps) reaches this; null = off", gt=0, le=1)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "sft") -> "SftConfig":
        check_fields(self, section)
        check_files(f"{section}.train_files", self.train_files, DATA_EXTENSIONS)
        return self


__all__ = ["OptimConfig", "TrainConfig", "LogConfig", "SftConfig"]
