"""Greedy generation through the engine (paged cache, chunked prefill mixed with decodes, fused kernels) equals
transformers' `generate(do_sample=False)` token for token, for every architecture, on a ragged batch."""
import pytest
import torch
from tiny_models import TINY_CONFIGS, make_hf_model

from arpo.engine import LLMEngine, SamplingParams
from arpo.model import CausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEW_TOKENS = 10


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_ragged_batch_matches_hf_generate(name, tmp_path):
    hf = make_hf_model(name, seed=2, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    ours = CausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, hf.config.vocab_size, (n,), generator=g).tolist() for n in (5, 1, 12, 7)]
    engine = LLMEngine(ours, num_blocks=48, block_size=4, max_num_batched_tokens=9)  # chunked prefill + decodes
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf, prompt)
        assert out.finish_reason == "length"
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the prompts steer the model: not one fixed continuation
