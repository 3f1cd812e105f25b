"""The position-wise pieces of a decoder block: RMSNorm, rotary embedding, SwiGLU MLP.

Numerics follow transformers' Qwen2 / Qwen3 / Llama so that our logits match it: RMSNorm normalises in fp32 and
multiplies the weight in the input dtype; RoPE angles are computed in fp32, scaled by the RoPE type's attention
factor (YaRN) and cast to the activation dtype; the rotation is the "rotate half" layout. The MLP keeps gate and
up in one fused matrix (`gate_up_proj`, gate rows first; with a bias where Llama's `mlp_bias` asks) so a
decode step runs one GEMM instead of two; loading.py splits and joins it against the checkpoint's names.
The eager ops themselves live in `arpo_kernels.fused_ops` as the references of its fused kernels (which the
model runs when autograd is off), so training and decoding share one definition.
"""
from __future__ import annotations

import torch
from torch import nn

from arpo_kernels.fused_ops import rms_norm_reference, silu_mul, silu_mul_reference

from .rope import inverse_frequencies


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary (packed, tree-depth or cache) positions: `forward(positions [T]) -> [T, D]`."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling  # ModelConfig.rope_scaling: None, or a yarn / llama3 parameter dict
        self.attention_factor = inverse_frequencies(head_dim, theta, scaling)[1]
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return inverse_frequencies(self.head_dim, self.theta, self.scaling)[0]

    def reset(self, device: torch.device | str) -> None:
        """Recompute the table (after `to_empty`, which leaves buffers uninitialised)."""
        self.inv_freq = self._inv_freq().to(device)

    def _apply(self, fn, recurse=True):
        # keep the frequencies in fp32 through model.to(bfloat16): a bf16 table would shift every angle
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # autograd off: one fused launch (same numbers); on: the eager ops autograd differentiates
        act = silu_mul(gate_up) if not torch.is_grad_enabled() else silu_mul_reference(gate_up)
        return self.down_proj(act)
