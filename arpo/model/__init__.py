"""One Qwen2-family causal LM shared by the trainer and the engine (see qwen2.py)."""
from .attention import HAS_FLASH_ATTN
from .config import ModelConfig, UnsupportedConfigError
from .context import AttentionContext
from .loading import checkpoint_layout
from .qwen2 import Qwen2Model

__all__ = [
    "HAS_FLASH_ATTN",
    "AttentionContext",
    "ModelConfig",
    "Qwen2Model",
    "UnsupportedConfigError",
    "checkpoint_layout",
]
