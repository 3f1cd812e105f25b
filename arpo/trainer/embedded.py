"""The policy model and tokenizer of a run: a local Hugging Face checkpoint, or the embedded tiny model.

`model.path: embedded` (the default of `arpo train` with no config) means a 0.8M-parameter character-level Qwen2
(hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, tied embeddings, the 54-symbol tokenizer of
`arpo.data.char_tokenizer`). It is created once, with a seeded initialisation, in `RUN_DIR/base_model/` in Hugging
Face format (config.json + safetensors + tokenizer), and reused from there by every later run in that directory —
so a run directory is self-contained and its base model loads in transformers as well.
"""
from __future__ import annotations

import os

import torch

from arpo.model import ModelConfig, Qwen2Model

BASE_MODEL_DIR = "base_model"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name!r} but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """`auto` → float32 on CPU, the checkpoint's dtype (bfloat16 if unset) on CUDA."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return checkpoint_dtype or torch.bfloat16


def embedded_model_config(section, vocab_size: int, max_positions: int = 2048) -> ModelConfig:
    s = section
    if s.embedded_hidden_size % s.embedded_heads:
        raise ValueError(f"model.embedded_hidden_size={s.embedded_hidden_size} is not divisible by "
                         f"model.embedded_heads={s.embedded_heads}")
    if s.embedded_heads % s.embedded_kv_heads:
        raise ValueError(f"model.embedded_kv_heads={s.embedded_kv_heads} must divide "
                         f"model.embedded_heads={s.embedded_heads}")
    raw = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return ModelConfig(vocab_size=vocab_size, hidden_size=s.embedded_hidden_size,
                       intermediate_size=s.embedded_intermediate_size, num_hidden_layers=s.embedded_layers,
                       num_attention_heads=s.embedded_heads, num_key_value_heads=s.embedded_kv_heads,
                       head_dim=s.embedded_hidden_size // s.embedded_heads, tie_word_embeddings=True,
                       max_position_embeddings=max_positions, raw=raw)


@torch.no_grad()
def init_weights(model: Qwen2Model, seed: int, std: float = 0.02) -> Qwen2Model:
    """Qwen2's initialisation (normal(0, 0.02) matrices, zero biases, unit norms), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def create_embedded_model(model_section, out_dir: str, seed: int = 0) -> str:
    """Write a freshly initialised embedded model + tokenizer to `out_dir` (atomically); returns `out_dir`."""
    from arpo.data import load_embedded_tokenizer

    tokenizer = load_embedded_tokenizer()
    model = init_weights(Qwen2Model(embedded_model_config(model_section, len(tokenizer))), seed)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def embedded_base_dir(run_dir: str, model_section, seed: int = 0) -> str:
    """`run_dir/base_model`, created on first use and reused afterwards."""
    path = os.path.join(run_dir, BASE_MODEL_DIR)
    if not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(run_dir, exist_ok=True)
        create_embedded_model(model_section, path, seed)
    return path


def load_tokenizer(path: str):
    """The tokenizer saved next to a checkpoint (transformers' AutoTokenizer).

    A tokenizer saved as a plain `tokenizers` pipeline (the embedded character tokenizer) is loaded as one:
    AutoTokenizer would pick the class of config.json's model type (Qwen2Tokenizer), whose own pre-tokenizer
    drops spaces, newlines and unknown characters from every encoded text (tool results included)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if _saved_tokenizer_class(path) in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - name the directory; transformers' messages rarely do
        raise RuntimeError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from exc


def _saved_tokenizer_class(path: str) -> str | None:
    import json

    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def policy_dtype(path: str, model_section) -> torch.dtype:
    """The dtype the configured policy computes in (model.dtype resolved for its device and checkpoint)."""
    return resolve_dtype(model_section.dtype, resolve_device(model_section.device),
                         ModelConfig.from_file(path).torch_dtype)


def load_policy(path: str, model_section, dtype: torch.dtype | None = None) -> tuple[Qwen2Model, object]:
    """(model, tokenizer) from a checkpoint directory, on the configured device and dtype (or `dtype`)."""
    device = resolve_device(model_section.device)
    dtype = dtype or policy_dtype(path, model_section)
    model = Qwen2Model.from_pretrained(path, dtype=dtype, device=device)
    model.gradient_checkpointing = bool(model_section.gradient_checkpointing)
    return model, load_tokenizer(path)


def base_model_path(cfg) -> str:
    """The directory the run starts from: model.path, or the embedded model in the run dir."""
    if cfg.model.path == "embedded":
        return embedded_base_dir(cfg.train.run_dir, cfg.model, cfg.train.seed)
    return cfg.model.path
