"""One causal LM (Qwen2 / Qwen2.5, Qwen3 dense, Llama 3.x) shared by the trainer and the engine (causal_lm.py)."""
from .attention import HAS_FLASH_ATTN
from .causal_lm import CausalLM, Qwen2Model
from .config import ModelConfig, UnsupportedConfigError
from .context import AttentionContext
from .loading import checkpoint_layout

__all__ = [
    "HAS_FLASH_ATTN",
    "AttentionContext",
    "CausalLM",
    "ModelConfig",
    "Qwen2Model",
    "UnsupportedConfigError",
    "checkpoint_layout",
]
