"""The engine stops on every EOS id a checkpoint declares, like HF generate; a checkpoint without tokenizer files
runs on token ids and refuses the text features instead of guessing a tokenizer."""
import copy
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arpo.engine import LLMEngine, SamplingParams  # noqa: E402
from arpo.engine.stop_ids import eos_ids, primary_eos  # noqa: E402
from arpo.engine.tokenizer_files import checkpoint_tokenizer  # noqa: E402
from arpo.model import ModelConfig, Qwen2Model  # noqa: E402

LENS = (5, 1, 12, 7, 4)
MAX = 12


def _hf_model(vocab: int = 211, seed: int = 0):
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rms_norm_eps=1e-6,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # peaked, seed-sensitive distributions
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def _prompts(vocab: int, lens=LENS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]


def _engine(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LLMEngine.from_pretrained(path, dtype=torch.float32, num_blocks=64, block_size=4, **kw)


def _cut(out: list[int], stops) -> list[int]:
    """`out` up to and including its first stop id."""
    for i, t in enumerate(out):
        if t in stops:
            return out[: i + 1]
    return out


def _word_tokenizer(vocab: int, eos: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", pad_token="t0")


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    """A checkpoint whose generation_config.json lists two EOS ids [a, b], both reached by greedy decoding of the
    prompts (a by prompt 0, b by a later one); config.json's eos_token_id is a, as in Qwen2.5's files."""
    hf = _hf_model()
    plain = str(tmp_path_factory.mktemp("plain"))
    hf.save_pretrained(plain)
    prompts = _prompts(hf.config.vocab_size)
    free = [o.token_ids for o in _engine(plain, eos_token_id=[]).generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX))]
    a = free[0][3]
    b = next(t for out in free[1:] for i, t in enumerate(out) if a not in out[: i + 1] and t not in out[:i])
    hf.config.eos_token_id = a
    hf.generation_config.eos_token_id = [a, b]
    path = str(tmp_path_factory.mktemp("two_eos"))
    hf.save_pretrained(path)
    return hf, path, prompts, free, (a, b)


def test_generation_stops_at_either_declared_eos_and_equals_hf_generate(declared):
    _, path, prompts, free, (a, b) = declared
    engine = _engine(path)
    assert engine.eos_token_ids == {a, b}
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX))
    assert [o.token_ids for o in outs] == [_cut(f, {a, b}) for f in free]
    assert {o.stop_reason for o in outs if o.finish_reason == "stop"} == {a, b}

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == [a, b]
    width = max(LENS)  # one left-padded ragged batch; HF pads a row after its EOS
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    gen = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX, do_sample=False, pad_token_id=0)
    assert [_cut(row[width:].tolist(), {a, b})[: MAX] for row in gen] == [o.token_ids for o in outs]


def test_ignore_eos_and_an_explicit_eos_override_the_declared_ids(declared):
    _, path, prompts, free, (a, b) = declared
    outs = _engine(path).generate(prompts, SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True))
    assert [o.token_ids for o in outs] == free
    only_b = _engine(path, eos_token_id=b)
    assert only_b.eos_token_ids == {b}
    outs = only_b.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX))
    assert [o.token_ids for o in outs] == [_cut(f, {b}) for f in free]


def test_a_tokenizer_eos_that_differs_from_the_config_stops_too(declared, tmp_path):
    hf, _, prompts, free, (a, b) = declared
    hf = copy.deepcopy(hf)
    hf.config.eos_token_id = a
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    _word_tokenizer(hf.config.vocab_size, eos=b).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tokenizer files are there: no warning
        engine = LLMEngine.from_pretrained(str(tmp_path), dtype=torch.float32, num_blocks=64, block_size=4)
    assert engine.tokenizer.eos_token_id == b and engine.eos_token_ids == {a, b}
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX))
    assert [o.token_ids for o in outs] == [_cut(f, {a, b}) for f in free]
    assert outs[0].text == " ".join(f"t{t}" for t in outs[0].token_ids)  # the saved pipeline's own decoding


def test_a_checkpoint_without_tokenizer_files_runs_on_ids_to_max_tokens(tmp_path):
    from arpo.rollout import TreeRollout
    from arpo.build import load_tokenizer

    hf = _hf_model(vocab=8)
    hf.save_pretrained(tmp_path)
    assert checkpoint_tokenizer(str(tmp_path)) is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(2):
            engine = LLMEngine.from_pretrained(str(tmp_path), dtype=torch.float32, num_blocks=128, block_size=4)
    said = [str(w.message) for w in seen if "no tokenizer files" in str(w.message)]
    assert len(said) == 1 and "stop strings, tool calls and chat need a tokenizer" in said[0]  # once
    assert engine.tokenizer is None and engine.eos_token_ids == frozenset()
    outs = engine.generate(_prompts(8, (3, 6, 1, 4)), SamplingParams(temperature=1.0, max_tokens=40, seed=3))
    assert all(len(o.token_ids) == 40 and o.finish_reason == "length" and o.text is None for o in outs)
    assert any(0 in o.token_ids for o in outs)  # a made-up tokenizer's eos (0) would have stopped these
    with pytest.raises(ValueError, match=r"SamplingParams.stop=\['</search>'\]: .*need a tokenizer"):
        engine.add([1, 2], SamplingParams(stop=("</search>",)))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        TreeRollout(engine)
    with pytest.raises(RuntimeError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))  # training needs one


def test_only_vocabulary_files_count_as_a_tokenizer(tmp_path):
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>"}, f)
    assert checkpoint_tokenizer(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(RuntimeError, match=r"tokenizer files \['tokenizer.json'\] but they do not load"):
        checkpoint_tokenizer(str(tmp_path))


def test_the_stop_set_is_the_union_of_the_declared_ids():
    cfg = ModelConfig(vocab_size=50, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, raw={"eos_token_id": [7, 3]},
                      generation={"eos_token_id": [3, 9]})
    tok = type("Tok", (), {"eos_token_id": 11})()
    assert eos_ids(cfg, tok) == {3, 7, 9, 11} and eos_ids(cfg) == {3, 7, 9}
    assert eos_ids(cfg, tok, explicit=5) == {5} and eos_ids(cfg, tok, explicit=[]) == frozenset()
    assert primary_eos(cfg, tok) == 11 and primary_eos(cfg) == 3
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list"):
        eos_ids(cfg, explicit="2")


def test_checkpoints_carry_the_generation_config_on(declared, tmp_path):
    _, path, _, _, (a, b) = declared
    model = Qwen2Model.from_pretrained(path, dtype=torch.float32)
    assert model.config.generation["eos_token_id"] == [a, b]
    model.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [a, b]
    assert ModelConfig.from_file(str(tmp_path)).generation["eos_token_id"] == [a, b]


def test_saved_embedded_tokenizer_keeps_spaces_and_newlines(tmp_path):
    """The embedded checkpoint's tokenizer (a saved tokenizers pipeline) reloads as itself: AutoTokenizer would
    pick Qwen2Tokenizer from config.json, whose pre-tokenizer drops spaces and newlines from every text."""
    from arpo.build import create_embedded_model, load_tokenizer
    from arpo.data import load_embedded_tokenizer
    from arpo.model.policy_config import PolicyConfig

    create_embedded_model(PolicyConfig(), str(tmp_path / "m"))
    text = "x = 3 * 4\nprint(x)  + 12"
    saved, fresh = load_tokenizer(str(tmp_path / "m")), load_embedded_tokenizer()
    assert saved.encode(text, add_special_tokens=False) == fresh.encode(text, add_special_tokens=False)
    assert saved.decode(saved.encode(text, add_special_tokens=False)) == text
