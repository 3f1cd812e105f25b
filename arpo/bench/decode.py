"""Decoding throughput: our engine vs Hugging Face `generate` on the same model, prompts and token counts.

Workloads:
- `batch B`: B ragged prompts, greedy, a fixed number of new tokens each (EOS ignored), tokens/s.
- `tree`: one prompt, 8 branches of new tokens forked after it. The engine prefills the prompt once and forks
  (children share its blocks); HF re-runs the full prefix for each branch (8 copies of the prompt in a batch),
  which is what re-submitting branches does. Prefill tokens computed by each side are reported.
Models have random weights (throughput does not depend on them): ~10M parameters on the CPU, a Qwen2.5-0.5B
shape on the GPU.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

DOC = "engine vs HF generate: tokens/s on ragged batches and on an 8-branch tree (prefill tokens counted)"
BASELINE = "hf-generate"
REPS = (1, 3)

CPU_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
GPU_MODEL = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


@dataclass
class Case:
    kind: str          # "batch" | "tree"
    batch: int
    prompt_lens: tuple[int, ...]
    new_tokens: int
    device: str

    @property
    def label(self) -> str:
        if self.kind == "tree":
            return f"tree prompt={self.prompt_lens[0]} 8x{self.new_tokens}"
        return f"batch {self.batch} ragged new={self.new_tokens}"

    def extra(self) -> dict:
        return {"kind": self.kind, "batch": self.batch, "new_tokens": self.new_tokens,
                "generated_tokens": self.batch * self.new_tokens}


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    out = []
    batches = (1, 8) if quick else ((1, 8, 32, 64) if gpu else (1, 8, 32))
    new = 16 if quick else (128 if gpu else 64)
    for b in batches:
        lens = tuple(int(x) for x in torch.randint(16, 256 if gpu else 128, (b,), generator=g))
        out.append(Case("batch", b, lens, new, device))
    out.append(Case("tree", 8, (512,), 32 if quick else 128, device))
    return out


_MODELS: dict = {}


def _models(device: str):
    """(HF model, our model) with identical random weights, built once per device."""
    if device in _MODELS:
        return _MODELS[device]
    import transformers

    from arpo.model import CausalLM

    gpu = device.startswith("cuda")
    cfg = transformers.Qwen2Config(**(GPU_MODEL if gpu else CPU_MODEL), max_position_embeddings=4096,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    hf = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = CausalLM.from_pretrained(d, dtype=dtype, device=device).eval()
    hf = hf.to(device)
    _MODELS[device] = (hf, ours)
    return hf, ours


def _prompts(case: Case, vocab: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in case.prompt_lens]


def _hf_provider(case: Case):
    hf, _ = _models(case.device)
    prompts = _prompts(case, hf.config.vocab_size)
    if case.kind == "tree":
        prompts = prompts * 8
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=case.device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=case.device)

    def run():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=case.new_tokens,
                               min_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0)
    run.extra = {"prefill_tokens": sum(len(p) for p in prompts)}
    return run


def _engine_provider(case: Case):
    from arpo.engine import LLMEngine, SamplingParams

    _, ours = _models(case.device)
    prompts = _prompts(case, ours.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=case.new_tokens, ignore_eos=True)
    need = sum(len(p) for p in prompts) + 8 * case.new_tokens + case.batch * case.new_tokens
    engine = LLMEngine(ours, block_size=16, num_blocks=need // 16 + 64 * 8, max_num_batched_tokens=8192)

    def run():
        engine.stats.update({k: 0 for k in engine.stats})
        if case.kind == "batch":
            return engine.generate(prompts, params)
        parent = engine.add(prompts[0], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        children = engine.fork(parent, 8, at=len(prompts[0]), params=params)
        engine.release(parent)
        while engine.has_unfinished():
            engine.step()
        for c in children:
            engine.release(c)
    run()
    run.extra = {"prefill_tokens": engine.stats["prefill_tokens"], "refed_tokens": engine.stats["refed_tokens"]}
    run.engine = engine
    return run


def providers(device: str) -> dict:
    return {"hf-generate": _hf_provider, "arpo-engine": _engine_provider}


def threads_note() -> str:
    return f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
