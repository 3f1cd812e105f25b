"""Checkpoints in and out, for every architecture: HF single/sharded safetensors load into our model; our saves
load back in transformers (through AutoModelForCausalLM, so the written model_type and architectures are the
right ones) with identical logits; unsupported configs and broken checkpoints fail loudly, naming the field."""
import json
import os

import pytest
import torch
from tiny_models import ARCH_OF, hf_padded_logits, make_hf_model, pack
from safetensors.torch import load_file, save_file

from arpo.model import AttentionContext, ModelConfig, CausalLM, UnsupportedConfigError

transformers = pytest.importorskip("transformers")


def _logits(model, seqs):
    ids, pos, cu = pack(seqs)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, AttentionContext.varlen(cu)))


SEQS = [[5, 17, 2, 250, 9], [44, 1], [7, 7, 7, 100, 200, 3, 255]]  # every tiny vocabulary has > 255 tokens


@pytest.mark.parametrize("name", ["gqa7-untied", "gqa2-tied", "qwen3-bias-yarn", "llama3-gqa2"])
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
    assert type(reloaded_hf) is type(hf) and reloaded.config.rope_scaling == ours.config.rope_scaling
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


def _base_config(tmp_path, name: str = "gqa2-tied") -> dict:
    make_hf_model(name).config.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        return json.load(f)


COMMON_UNSUPPORTED = [
    ("hidden_act", "gelu"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "rope_theta": 1e4}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "low_freq_factor": 1.0}),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
    ("rope_parameters", {"rope_type": "yarn", "factor": "4", "rope_theta": 1e4}),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("partial_rotary_factor", 0.5),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("num_key_value_heads", 3),
    ("num_experts", 8),
    ("num_local_experts", 4),
    ("attention_dropout", 0.1),
    ("quantization_config", {"quant_method": "gptq"}),
    ("vocab_size", None),
    ("head_dim", 15),
    ("torch_dtype", "int8"),
]
UNSUPPORTED = {
    "gqa2-tied": COMMON_UNSUPPORTED + [
        ("model_type", "gemma"),
        ("model_type", "qwen2_moe"),
        ("architectures", ["Qwen2ForSequenceClassification"]),
        ("use_sliding_window", True),
        ("attention_bias", False),
        ("mlp_bias", True),
        ("hidden_size", 66),
    ],
    "qwen3-gqa2-tied": COMMON_UNSUPPORTED + [
        ("model_type", "qwen3_moe"),
        ("architectures", ["Qwen2ForCausalLM"]),
        ("use_sliding_window", True),
        ("mlp_bias", True),
        ("attention_bias", "yes"),
    ],
    "llama3-gqa2": COMMON_UNSUPPORTED + [
        ("architectures", ["LlamaForSequenceClassification"]),
        ("mlp_bias", 1),
    ],
}


@pytest.mark.parametrize("name, field, value",
                         [(name, f, v) for name, cases in UNSUPPORTED.items() for f, v in cases])
def test_unsupported_config_raises_naming_the_field(tmp_path, name, field, value):
    d = _base_config(tmp_path, name)
    d.pop("dtype", None)
    if field == "rope_parameters" and "rope_theta" not in value:
        d.pop("rope_theta", None)
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


def test_qwen25_style_yarn_rope_scaling_parses_and_loads_like_transformers(tmp_path):
    """Qwen2.5's long-context setting is written in the 4.x layout (`"rope_scaling": {"type": "yarn", ...}` next to
    `rope_theta`); the original context length may also sit at the top level, which then wins."""
    d = _base_config(tmp_path)
    d.pop("rope_parameters")
    d["rope_theta"] = 5e5
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40}
    d["original_max_position_embeddings"] = 24
    assert ModelConfig.from_dict(d).rope_scaling["original_max_position_embeddings"] == 24
    del d["original_max_position_embeddings"]
    hf = make_hf_model("gqa2-tied", rope_theta=5e5, rope={"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 40})
    hf.save_pretrained(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "config.json", "w") as f:  # rewrite its config in the 4.x layout
        json.dump(d, f)
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    ours = CausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert (_logits(ours, SEQS) - _logits_hf(reloaded_hf, SEQS)).abs().max().item() <= 1e-4
    assert (_logits(ours, SEQS) - _logits_hf(hf, SEQS)).abs().max().item() <= 1e-4


def test_qwen3_head_dim_defaults_to_128(tmp_path):
    d = _base_config(tmp_path, "qwen3-gqa2-tied")
    del d["head_dim"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.head_dim == 128 and cfg.qk_norm and not cfg.qkv_bias and not cfg.o_proj_bias


def test_flags_a_model_type_cannot_express_are_refused():
    kw = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=4)
    ModelConfig(**kw, model_type="llama", qkv_bias=True, o_proj_bias=True, mlp_bias=True)
    with pytest.raises(UnsupportedConfigError, match="qwen2"):
        ModelConfig(**kw, qkv_bias=False)  # Qwen2 always has q/k/v biases
    with pytest.raises(UnsupportedConfigError, match="qwen3"):
        ModelConfig(**kw, model_type="qwen3", qkv_bias=False)  # without q/k norm
    with pytest.raises(UnsupportedConfigError, match="llama"):
        ModelConfig(**kw, model_type="llama", qkv_bias=True)  # attention_bias covers o_proj too


@pytest.mark.parametrize("name", ["qwen3-gqa2-tied", "llama-bias-headdim"])
def test_undeclared_bias_or_norm_tensor_is_refused(tmp_path, name):
    """A bias the config does not declare (or a missing q/k norm) is an error, not silently dropped."""
    make_hf_model(name).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    if ARCH_OF[name] == "qwen3":
        tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(64)
        save_file(tensors, file, metadata={"format": "pt"})
        with pytest.raises(ValueError, match="q_proj.bias"):
            CausalLM.from_pretrained(str(tmp_path))
        del tensors["model.layers.1.self_attn.q_proj.bias"], tensors["model.layers.0.self_attn.k_norm.weight"]
        save_file(tensors, file, metadata={"format": "pt"})
        with pytest.raises(ValueError, match="k_norm"):
            CausalLM.from_pretrained(str(tmp_path))
    else:
        with open(tmp_path / "config.json") as f:
            d = json.load(f)
        d["mlp_bias"] = False
        with open(tmp_path / "config.json", "w") as f:
            json.dump(d, f)
        with pytest.raises(ValueError, match="mlp.*bias"):
            CausalLM.from_pretrained(str(tmp_path))
