"""The policy model's settings, declared once: which checkpoint, on which device, in which dtype (the `model`
section of a run), and the shape of the embedded tiny model that `model.path: embedded` creates."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from arpo.settings import ConfigError, check_fields, opt


@dataclass
class PolicyConfig:
    """The policy model."""

    path: str = opt("embedded", "local Hugging Face Qwen2/Qwen2.5 directory (config.json + safetensors + tokenizer), "
                    "or 'embedded': create (or reuse) the tiny character-level model in the run directory")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "parameter dtype; auto = float32 on CPU, the checkpoint's dtype (bfloat16 if unset) on CUDA")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available)")
    gradient_checkpointing: bool = opt(False, "recompute decoder-layer activations in backward to save memory")
    embedded_hidden_size: int = opt(128, "embedded model: hidden size", gt=0)
    embedded_layers: int = opt(4, "embedded model: decoder layers", gt=0)
    embedded_heads: int = opt(4, "embedded model: attention heads", gt=0)
    embedded_kv_heads: int = opt(2, "embedded model: key/value heads (GQA)", gt=0)
    embedded_intermediate_size: int = opt(384, "embedded model: MLP width", gt=0)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "model") -> "PolicyConfig":
        check_fields(self, section)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{section}.device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not self.path.strip():
            raise ConfigError(f"{section}.path must not be empty")
        return self


__all__ = ["PolicyConfig"]
