"""The tiny random Qwen2 shared by the engine tests that compare two decode paths token for token."""
import pytest
import torch


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from arpo.model import Qwen2Model

    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # peaked distributions: greedy ties are impossible in practice
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return Qwen2Model.from_pretrained(str(path), dtype=torch.float32, device="cpu")
