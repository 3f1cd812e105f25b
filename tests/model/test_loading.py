"""Checkpoints in and out: HF single/sharded safetensors load into our model; our saves load back in
transformers with identical logits; unsupported configs and broken checkpoints fail loudly."""
import json
import os

import pytest
import torch
from tiny_models import hf_padded_logits, make_hf_model, pack
from safetensors.torch import load_file, save_file

from arpo.model import AttentionContext, ModelConfig, CausalLM, UnsupportedConfigError

transformers = pytest.importorskip("transformers")


def _logits(model, seqs):
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, AttentionContext.varlen(cu)))


SEQS = [[5, 17, 2, 300, 9], [44, 1], [7, 7, 7, 100, 200, 3, 1000 % 517]]


@pytest.mark.parametrize("name", ["gqa7-untied", "gqa2-tied"])
def test_hf_sharded_checkpoint_loads(tmp_path, name):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    ours = CausalLM.from_pretrained(str(tmp_path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (_logits(ours, SEQS) - _logits_hf(theirs, SEQS)).abs().max().item() <= 1e-4


def _logits_hf(hf, seqs):
    return torch.cat(hf_padded_logits(hf, seqs))


@pytest.mark.parametrize("shard", [None, 30_000])
def test_our_save_loads_in_transformers_and_back(hf_checkpoint, tmp_path, shard):
    hf, path = hf_checkpoint
    ours = CausalLM.from_pretrained(path)
    with torch.no_grad():  # make sure we save *our* weights, not a copy of the original files
        ours.norm.weight.mul_(1.5)
    out = tmp_path / "saved"
    ours.save_pretrained(str(out), max_shard_size=shard)
    assert os.path.exists(out / "model.safetensors.index.json") == (shard is not None)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reloaded = CausalLM.from_pretrained(str(out))
    expect = _logits(ours, SEQS)
    assert (expect - _logits(reloaded, SEQS)).abs().max().item() == 0
    assert (expect - _logits_hf(reloaded_hf, SEQS)).abs().max().item() <= 1e-4
    assert reloaded_hf.config.tie_word_embeddings == ours.config.tie_word_embeddings
    assert (expect - _logits_hf(hf, SEQS)).abs().max().item() > 1e-3  # the edit is visible


def test_tied_head_is_the_embedding(tmp_path):
    make_hf_model("gqa2-tied").save_pretrained(tmp_path)
    model = CausalLM.from_pretrained(str(tmp_path))
    assert model.lm_head is None and model.lm_head_weight is model.embed_tokens.weight
    names = {n for n, _ in model.named_parameters()}
    assert not any("lm_head" in n for n in names)


def test_dtype_and_parameters_are_plain(tmp_path):
    make_hf_model("gqa7-untied").save_pretrained(tmp_path)
    model = CausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())
    assert model.rotary.inv_freq.dtype == torch.float32
    ref = CausalLM.from_pretrained(str(tmp_path))
    diff = (_logits(model, SEQS[:2]).float() - _logits(ref, SEQS[:2])).abs().max().item()
    assert diff < 0.25  # bf16 rounding only


def test_missing_or_misshapen_tensor_raises(tmp_path):
    make_hf_model("gqa7-untied").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        CausalLM.from_pretrained(str(tmp_path))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shape"):
        CausalLM.from_pretrained(str(tmp_path))
    tensors["model.norm.weight"] = torch.ones(56)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(56)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor"):
        CausalLM.from_pretrained(str(tmp_path))
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CausalLM.from_pretrained(str(tmp_path))


def _base_config(tmp_path) -> dict:
    make_hf_model("gqa2-tied").config.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        return json.load(f)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_type", "llama"),
        ("architectures", ["Qwen2ForSequenceClassification"]),
        ("hidden_act", "gelu"),
        ("use_sliding_window", True),
        ("rope_scaling", {"type": "yarn", "factor": 4.0}),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        ("layer_types", ["full_attention", "sliding_attention"]),
        ("num_key_value_heads", 3),
        ("attention_dropout", 0.1),
        ("quantization_config", {"quant_method": "gptq"}),
        ("vocab_size", None),
        ("hidden_size", 66),
        ("torch_dtype", "int8"),
    ],
)
def test_unsupported_config_raises_naming_the_field(tmp_path, field, value):
    d = _base_config(tmp_path)
    d.pop("dtype", None)
    d[field] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        ModelConfig.from_dict(d)


def test_both_rope_layouts_parse(tmp_path):
    d = _base_config(tmp_path)
    assert ModelConfig.from_dict(d).rope_theta == 10000.0
    d.pop("rope_parameters")
    d["rope_theta"], d["rope_scaling"] = 123.0, None  # transformers 4.x layout
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 123.0 and cfg.head_dim == 16 and cfg.num_key_value_heads == 2
