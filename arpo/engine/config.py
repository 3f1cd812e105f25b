"""The engine's settings, declared once: `LLMEngine(model, EngineConfig(...))` or `LLMEngine(model, block_size=4)`.

A run (`arpo train`, `eval`, `rollout`) composes this as its `engine` section; fields marked `derived` are set by
the run from other sections (the context length from the prompt and response caps, the seed from `train.seed`)
and are neither printed nor overridable there. The KV dtype is not a setting: it is the dtype the weights are
decoded in, which the caller knows (`LLMEngine(..., kv_dtype=)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, opt

DECODE_GRAPHS = ("auto", "cuda", "eager", "compile", "off")


@dataclass
class EngineConfig:
    """The decoding engine: paged KV cache, continuous batching, decode graphs."""

    block_size: int = opt(16, "tokens per KV-cache block", gt=0)
    num_blocks: Optional[int] = opt(None, "KV-cache blocks; null = sized from memory_fraction on CUDA, and on the "
                                    "CPU room for the run's sequences (at most 1 GiB)", gt=0)
    memory_fraction: float = opt(0.3, "CUDA: share of the free GPU memory given to the KV cache when num_blocks "
                                 "is null", gt=0, le=1)
    max_num_seqs: int = opt(256, "sequences decoded together in one step (a run raises it to what one rollout "
                            "batch needs)", gt=0)
    max_num_batched_tokens: int = opt(4096, "tokens fed in one step (decodes + prefill chunks; a run raises it to "
                                      "4 prompts' worth)", gt=0)
    decode_graphs: Literal["auto", "cuda", "eager", "compile", "off"] = opt(
        "auto", "decode-step path: cuda = captured CUDA graphs, compile = torch.compile'd CPU step, eager = the "
                "padded path without capture (tests), off = plain forward; auto = cuda on CUDA, else off")
    decode_overlap: Literal["auto", "on", "off"] = opt(
        "auto", "launch the next decode step before step() returns, so the device computes it while the host "
                "handles this step's tokens (dropped, with its K/V kept, when add/fork/extend/resume changes the "
                "batch); auto = on with CUDA graphs, else off")
    max_model_len: Optional[int] = opt(None, "longest sequence (prompt + response); null = the model's "
                                       "max_position_embeddings", gt=1,
                                       derived="data.max_prompt_tokens + rollout.max_response_tokens + 1")
    enable_prefix_caching: bool = opt(True, "reuse cached blocks of identical prompt prefixes",
                                      derived="off: cached K/V would hold an earlier step's weights")
    seed: int = opt(0, "seed of the sampling seeds given to requests that bring none", derived="train.seed")

    def __post_init__(self):
        self.check()

    def check(self, section: str = "engine") -> "EngineConfig":
        check_fields(self, section)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"{section}.max_model_len={self.max_model_len}: must be >= 2")
        return self

    def resolved_graphs(self, device_type: str) -> str:
        """The decode path for a model on `device_type` (auto → cuda on CUDA, else off)."""
        if self.decode_graphs == "auto":
            return "cuda" if device_type == "cuda" else "off"
        return self.decode_graphs

    def resolved_overlap(self, device_type: str) -> bool:
        """Whether decode steps are launched ahead (auto → on where the decode path is CUDA graphs)."""
        if self.decode_overlap == "auto":
            return self.resolved_graphs(device_type) == "cuda"
        return self.decode_overlap == "on"


__all__ = ["EngineConfig", "DECODE_GRAPHS"]
