"""Hugging Face checkpoint ⇄ our module: safetensors in (single file or sharded), safetensors out.

Loading builds the module on the meta device, allocates its parameters uninitialised on the target device in
the target dtype, and copies each checkpoint tensor straight into its parameter (or into its rows of a fused
one) — no random init, no second copy of the weights. `checkpoint_layout` is the one table that maps the
checkpoint's names to ours; saving walks the same table backwards, so a saved checkpoint loads in
transformers' `Qwen2ForCausalLM` (and in ours) with identical weights.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import GENERATION_CONFIG, ModelConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# a checkpoint name → (our parameter, first row, end row); rows None = the whole tensor
Layout = dict[str, tuple[str, int | None, int | None]]


def checkpoint_layout(cfg: ModelConfig) -> Layout:
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    layout: Layout = {"model.embed_tokens.weight": ("embed_tokens.weight", None, None)}
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            fused = f"{ours}self_attn.qkv_proj.{kind}"
            layout[f"{hf}self_attn.q_proj.{kind}"] = (fused, 0, q)
            layout[f"{hf}self_attn.k_proj.{kind}"] = (fused, q, q + kv)
            layout[f"{hf}self_attn.v_proj.{kind}"] = (fused, q + kv, q + 2 * kv)
        layout[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up_proj.weight", 0, inter)
        layout[f"{hf}mlp.up_proj.weight"] = (f"{ours}mlp.gate_up_proj.weight", inter, 2 * inter)
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            layout[hf + name] = (ours + name, None, None)
    layout["model.norm.weight"] = ("norm.weight", None, None)
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = ("lm_head.weight", None, None)
    return layout


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, SINGLE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"{path}: no {SINGLE} or {INDEX} (only safetensors checkpoints are supported, not pytorch_model.bin)"
    )


@torch.no_grad()
def load_model(cls, path: str, dtype: torch.dtype | None = None, device=None):
    cfg = ModelConfig.from_file(path)
    dtype = dtype or cfg.torch_dtype or torch.float32
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.rotary.reset(device)
    params = dict(model.named_parameters())
    layout = checkpoint_layout(cfg)
    seen: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name not in layout:
                    if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                        continue  # tied head stored anyway / a stale buffer
                    raise ValueError(f"{file}: unexpected tensor {name!r} for a Qwen2 causal LM")
                ours, start, stop = layout[name]
                dst = params[ours] if start is None else params[ours][start:stop]
                src = f.get_tensor(name)
                if src.shape != dst.shape:
                    raise ValueError(f"{file}: {name} has shape {tuple(src.shape)}, config implies {tuple(dst.shape)}")
                dst.copy_(src)
                seen.add(name)
    missing = sorted(set(layout) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    return model


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


@torch.no_grad()
def save_model(model, path: str, max_shard_size: int | str | None = None) -> None:
    """Write config.json, generation_config.json (if the config has one) and the weights (shards of at most
    `max_shard_size` bytes, "2GB" style allowed)."""
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_size)
    params = dict(model.named_parameters())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, (ours, start, stop) in checkpoint_layout(model.config).items():
        t = params[ours] if start is None else params[ours][start:stop]
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in os.listdir(path):  # stale weights from an earlier save would shadow or mix with these
        if old == INDEX or (old.startswith("model") and old.endswith(".safetensors")):
            os.remove(os.path.join(path, old))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(dtype=model.dtype), f, indent=2, sort_keys=True)
    if model.config.generation:  # the declared EOS ids travel with the weights
        with open(os.path.join(path, GENERATION_CONFIG), "w", encoding="utf-8") as f:
            json.dump(model.config.generation, f, indent=2, sort_keys=True)
