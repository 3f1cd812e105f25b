"""Read and validate a Hugging Face Qwen2 `config.json` without transformers.

We implement exactly one architecture (Qwen2 / Qwen2.5 causal LM: RMSNorm, default RoPE, GQA, SwiGLU, q/k/v
bias, tied or untied embeddings). Any config feature outside that — another model type, RoPE scaling, sliding
window attention, another activation, quantisation — is rejected here with an error naming the field, instead of
loading and silently computing something else. Both the transformers 4.x layout (`rope_theta`, `rope_scaling`)
and the 5.x layout (`rope_parameters`) are accepted.

`ModelConfig.to_hf_dict()` writes a config.json that transformers' `Qwen2ForCausalLM` loads, keeping the
fields we do not interpret (token ids, ...) from the original file. A `generation_config.json` next to it is kept
too (`generation`): it declares the end-of-sequence ids the engine stops on, and checkpoints written from this
config carry it on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
GENERATION_CONFIG = "generation_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedConfigError(ValueError):
    """The checkpoint's config.json asks for something this model does not implement."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str | None = None  # the checkpoint's declared dtype ("bfloat16", ...), if any
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the parsed file, kept for saving
    generation: dict[str, Any] = field(default_factory=dict, repr=False)  # generation_config.json, if any

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype) if self.dtype else None

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """`path` is config.json or the checkpoint directory holding it (and maybe generation_config.json)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = cls.from_dict(json.load(f))
        gen_path = os.path.join(os.path.dirname(path), GENERATION_CONFIG)
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                cfg.generation = json.load(f)
            if not isinstance(cfg.generation, dict):
                raise UnsupportedConfigError(f"{gen_path}: expected a JSON object")
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        def bad(key: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"config.json field {key!r}={d.get(key)!r}: {why}")

        if d.get("model_type") != "qwen2":
            raise bad("model_type", "only 'qwen2' (Qwen2 / Qwen2.5 causal LM) is supported")
        archs = d.get("architectures")
        if archs and "Qwen2ForCausalLM" not in archs:
            raise bad("architectures", "expected 'Qwen2ForCausalLM'")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise UnsupportedConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        for k in _REQUIRED:
            if not isinstance(d[k], int) or d[k] <= 0:
                raise bad(k, "must be a positive integer")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU MLP) is supported")
        if d.get("use_sliding_window", False):
            raise bad("use_sliding_window", "sliding-window attention is not supported; set it to false")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise bad("layer_types", "only 'full_attention' layers are supported")
        if d.get("rope_scaling") is not None:
            raise bad("rope_scaling", "RoPE scaling is not supported; only null")
        rope_theta = d.get("rope_theta", 10000.0)
        rp = d.get("rope_parameters")
        if rp is not None:
            rope_type = rp.get("rope_type", rp.get("type", "default"))
            if rope_type != "default":
                raise bad("rope_parameters", f"rope_type {rope_type!r} is not supported; only 'default'")
            rope_theta = rp.get("rope_theta", rope_theta)
        if d.get("attention_dropout", 0.0):
            raise bad("attention_dropout", "attention dropout is not supported; only 0.0")
        if d.get("quantization_config") is not None:
            raise bad("quantization_config", "quantised checkpoints are not supported")
        if d.get("num_key_value_heads") is None:
            kv_heads = d["num_attention_heads"]
        else:
            kv_heads = d["num_key_value_heads"]
        if not isinstance(kv_heads, int) or kv_heads <= 0 or d["num_attention_heads"] % kv_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={d['num_attention_heads']}")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if d["hidden_size"] % d["num_attention_heads"]:
                raise bad("hidden_size", f"must be divisible by num_attention_heads={d['num_attention_heads']}")
            head_dim = d["hidden_size"] // d["num_attention_heads"]
        if head_dim % 2:
            raise bad("head_dim", f"RoPE needs an even head_dim, got {head_dim}")
        dtype = d.get("dtype", d.get("torch_dtype"))
        if dtype is not None and dtype not in _DTYPES:
            raise bad("dtype" if "dtype" in d else "torch_dtype", f"expected one of {', '.join(_DTYPES)}")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=dtype,
            raw=dict(d),
        )

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A config.json for `Qwen2ForCausalLM`; `dtype` is the dtype the weights are saved in."""
        d = dict(self.raw)
        d.pop("torch_dtype", None)
        d.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            use_sliding_window=False,
            rope_theta=self.rope_theta,
            rope_scaling=None,
        )
        if self.head_dim != self.hidden_size // self.num_attention_heads or "head_dim" in self.raw:
            d["head_dim"] = self.head_dim
        if "rope_parameters" in d:
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        names = {v: k for k, v in _DTYPES.items()}
        if dtype is not None:
            d["dtype"] = names[dtype]
        return d
