"""RoPE inverse frequencies for the scaling schemes we implement: default, YaRN (Qwen2.5 / Qwen3 long context)
and Llama 3.1's frequency-dependent scaling. Written from the published formulas:

* default (Su et al., RoFormer): inv_freq_i = theta^(-2i/d), i = 0 .. d/2-1.
* YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension", sections 3.2-3.4): each dimension i keeps
  its original frequency (extrapolation) or divides it by `factor` (interpolation), blended by a ramp over the
  number of full rotations the dimension makes within the original context length L:
      d(r)   = d * ln(L / (2*pi*r)) / (2 * ln theta)     the dimension that makes r rotations in L
      lo, hi = floor(d(beta_fast)), ceil(d(beta_slow))   clamped to [0, d-1] (no floor/ceil when truncate=false)
      ramp_i = clamp((i - lo) / (hi - lo), 0, 1)          lo == hi: hi += 0.001
      inv_i  = inv_freq_i / factor * ramp_i + inv_freq_i * (1 - ramp_i)
  and cos/sin are multiplied by the attention factor ("mscale", eq. 21): 0.1 * ln(factor) + 1 (1 for
  factor <= 1), or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are given, or the config's
  `attention_factor` as is. Defaults beta_fast = 32, beta_slow = 1, truncate = true.
* llama3 (Meta's Llama 3.1 reference code, `apply_scaling`): with wavelength w_i = 2*pi / inv_freq_i and the
  original context L, frequencies with w_i < L / high_freq_factor stay, those with w_i > L / low_freq_factor are
  divided by `factor`, and the band between is blended with s = (L / w_i - low) / (high - low):
      inv_i = (1 - s) * inv_freq_i / factor + s * inv_freq_i.

Everything is computed in fp32, like the tables transformers builds, so logits agree with it to rounding.
`scaling` is the validated dict `ModelConfig.rope_scaling` (arpo/model/config.py): `rope_type` plus the
checkpoint's parameters, with `original_max_position_embeddings` always filled in.
"""
from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "yarn", "llama3")
# the parameters each scaled type reads (anything else in a config is rejected by config.py)
ROPE_KEYS = {
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
ROPE_REQUIRED = {"yarn": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponent)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, length = float(p["factor"]), p["original_max_position_embeddings"]
    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    inv = default_inv_freq(head_dim, theta)
    return inv / factor * ramp + inv * (1 - ramp), float(attention)


def _llama3(head_dim: int, theta: float, p: dict[str, Any]) -> torch.Tensor:
    factor, length = float(p["factor"]), p["original_max_position_embeddings"]
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    inv = default_inv_freq(head_dim, theta)
    wavelen = 2 * math.pi / inv
    smooth = (length / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > length / low, inv / factor, inv)
    return torch.where((wavelen >= length / high) & (wavelen <= length / low), blended, out)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, attention factor that multiplies cos and sin)."""
    rope_type = "default" if scaling is None else scaling["rope_type"]
    if rope_type == "default":
        return default_inv_freq(head_dim, theta), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "llama3":
        return _llama3(head_dim, theta, scaling), 1.0
    raise ValueError(f"rope_type {rope_type!r}: expected one of {', '.join(ROPE_TYPES)}")
