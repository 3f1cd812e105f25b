"""Read and validate a Hugging Face `config.json` for the causal LMs we implement, without transformers.

One architecture family (pre-norm decoder: RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings) in three
checkpoint dialects, told apart by `model_type`:

* `qwen2` (Qwen2 / Qwen2.5, `Qwen2ForCausalLM`): q/k/v bias, no o_proj or MLP bias.
* `qwen3` (Qwen3 dense, `Qwen3ForCausalLM`): per-head RMSNorm on q and k before RoPE; `attention_bias` on
  q/k/v/o (false in the released models); `head_dim` defaults to 128, not hidden_size / heads.
* `llama` (Llama 3.x, `LlamaForCausalLM`): `attention_bias` on q/k/v/o and `mlp_bias` on the MLP.

RoPE: default, `yarn` or `llama3` scaling (the math is in rope.py), from either the transformers 4.x layout
(`rope_theta`, `rope_scaling`) or the 5.x one (`rope_parameters`). Any config feature outside this — another
model type, MoE, sliding-window attention, another RoPE type or a parameter we do not read, another activation,
quantisation — is rejected here with an `UnsupportedConfigError` naming the field, instead of loading and
silently computing something else.

`ModelConfig.to_hf_dict()` writes a config.json that transformers' class for the model type loads, keeping the
fields we do not interpret (token ids, ...) from the original file. A `generation_config.json` next to it is kept
too (`generation`): it declares the end-of-sequence ids the engine stops on, and checkpoints written from this
config carry it on.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .rope import ROPE_KEYS, ROPE_REQUIRED, ROPE_TYPES

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
GENERATION_CONFIG = "generation_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


class UnsupportedConfigError(ValueError):
    """The checkpoint's config.json asks for something this model does not implement."""


def layer_flags(model_type: str, attention_bias: bool = False, mlp_bias: bool = False) -> dict[str, bool]:
    """Which optional parameters a layer has, as the model type's config fields imply."""
    if model_type == "qwen2":  # bias on q/k/v always, nowhere else
        return dict(qkv_bias=True, o_proj_bias=False, mlp_bias=False, qk_norm=False)
    if model_type == "qwen3":
        return dict(qkv_bias=attention_bias, o_proj_bias=attention_bias, mlp_bias=False, qk_norm=True)
    if model_type == "llama":
        return dict(qkv_bias=attention_bias, o_proj_bias=attention_bias, mlp_bias=mlp_bias, qk_norm=False)
    raise UnsupportedConfigError(f"model_type {model_type!r}: expected one of {', '.join(ARCHITECTURES)}")


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
    model_type: str = "qwen2"
    qkv_bias: bool = True  # q/k/v projections carry a bias
    o_proj_bias: bool = False
    mlp_bias: bool = False  # gate, up and down projections carry a bias
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn" | "llama3", ...}; None = plain RoPE
    dtype: str | None = None  # the checkpoint's declared dtype ("bfloat16", ...), if any
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the parsed file, kept for saving
    generation: dict[str, Any] = field(default_factory=dict, repr=False)  # generation_config.json, if any

    def __post_init__(self):
        flags = dict(qkv_bias=self.qkv_bias, o_proj_bias=self.o_proj_bias, mlp_bias=self.mlp_bias,
                     qk_norm=self.qk_norm)
        if flags != layer_flags(self.model_type, self.qkv_bias, self.mlp_bias):
            raise UnsupportedConfigError(
                f"model_type {self.model_type!r} cannot express {flags} in its config.json "
                f"(it implies {layer_flags(self.model_type, self.qkv_bias, self.mlp_bias)})")

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

        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise bad("model_type", "supported: " + ", ".join(f"{t!r} ({a})" for t, a in ARCHITECTURES.items()))
        archs = d.get("architectures")
        if archs and ARCHITECTURES[model_type] not in archs:
            raise bad("architectures", f"expected {ARCHITECTURES[model_type]!r} for model_type {model_type!r}")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise UnsupportedConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        for k in _REQUIRED:
            if not isinstance(d[k], int) or d[k] <= 0:
                raise bad(k, "must be a positive integer")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU MLP) is supported")
        for k in _EXPERT_FIELDS:
            if d.get(k):
                raise bad(k, "mixture-of-experts models are not supported (dense checkpoints only)")
        if d.get("use_sliding_window", False):
            raise bad("use_sliding_window", "sliding-window attention is not supported; set it to false")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise bad("layer_types", "only 'full_attention' layers are supported")
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
        if head_dim is None and model_type == "qwen3" and "head_dim" not in d:
            head_dim = 128  # Qwen3Config's default, independent of hidden_size
        if head_dim is None:
            if d["hidden_size"] % d["num_attention_heads"]:
                raise bad("hidden_size", f"must be divisible by num_attention_heads={d['num_attention_heads']}")
            head_dim = d["hidden_size"] // d["num_attention_heads"]
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise bad("head_dim", f"RoPE needs a positive even head_dim, got {head_dim!r}")
        for k in ("attention_bias", "mlp_bias"):
            if not isinstance(d.get(k, False), bool):
                raise bad(k, "must be true or false")
        if model_type == "qwen2" and d.get("attention_bias") is False:
            raise bad("attention_bias", "Qwen2 always has q/k/v biases")
        if model_type != "llama" and d.get("mlp_bias"):
            raise bad("mlp_bias", f"{ARCHITECTURES[model_type]} has no MLP bias")
        max_positions = int(d.get("max_position_embeddings", 32768))
        rope_theta, rope_scaling = _rope(d, max_positions, bad)
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
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=model_type,
            **layer_flags(model_type, d.get("attention_bias", False), d.get("mlp_bias", False)),
            rope_scaling=rope_scaling,
            dtype=dtype,
            raw=dict(d),
        )

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A config.json for transformers' class of `model_type`; `dtype` is the dtype the weights are saved in.
        RoPE is written in both layouts (`rope_parameters` for 5.x, `rope_theta`/`rope_scaling` for 4.x)."""
        d = dict(self.raw)
        d.pop("torch_dtype", None)
        d.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
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
            rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
            rope_parameters={"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
        )
        if self.model_type != "qwen2" or self.head_dim != self.hidden_size // self.num_attention_heads \
                or "head_dim" in self.raw:
            d["head_dim"] = self.head_dim
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        names = {v: k for k, v in _DTYPES.items()}
        if dtype is not None:
            d["dtype"] = names[dtype]
        return d


def _rope(d: dict[str, Any], max_positions: int, bad) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the scaling dict or None). 4.x's `rope_scaling` wins over `rope_parameters`, as in
    transformers 5; `original_max_position_embeddings` falls back to the top-level field, then to
    max_position_embeddings (transformers' `standardize_rope_params`)."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        raise bad(key, "expected a JSON object")
    if any(isinstance(v, dict) for v in params.values()):
        raise bad(key, "per-layer-type RoPE parameters are not supported")
    theta = params.get("rope_theta", d.get("rope_theta")) or 10000.0
    if not isinstance(theta, numbers.Real) or theta <= 1:
        raise bad(key if "rope_theta" in params else "rope_theta", "rope_theta must be a number > 1")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise bad(key if "partial_rotary_factor" in params else "partial_rotary_factor",
                  "partial rotary embeddings are not supported; only 1.0")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise bad(key, f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta",
                                                             "partial_rotary_factor")}
    unknown = sorted(set(scaling) - ROPE_KEYS[rope_type])
    if unknown:
        raise bad(key, f"{rope_type} RoPE does not take {', '.join(unknown)} (it reads "
                       f"{', '.join(sorted(ROPE_KEYS[rope_type]))})")
    original = d.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") \
        or max_positions
    scaling["original_max_position_embeddings"] = original
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_positions / original
    for k in ROPE_REQUIRED[rope_type]:
        v = scaling.get(k)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0:
            raise bad(key, f"{rope_type} RoPE needs a positive number {k!r}, got {v!r}")
    if not isinstance(original, int) or original <= 0:
        raise bad(key, f"original_max_position_embeddings must be a positive integer, got {original!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise bad(key, "llama3 RoPE needs high_freq_factor > low_freq_factor")
    return theta, {"rope_type": rope_type, **scaling}
