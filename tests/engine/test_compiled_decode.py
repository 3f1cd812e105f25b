"""torch.compile'd CPU decode steps (`decode_graphs="compile"`) give the eager engine's tokens, through batches that
shrink to one sequence, forks (a re-fed token writes to the scratch slot) and extends — from one compiled graph."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from arpo.engine import LLMEngine, SamplingParams  # noqa: E402
from arpo.engine.compiled_decode import CompiledDecode  # noqa: E402


def _tree(engine, prompt):
    """A parent decoded 6 tokens, forked at 4 into 2 children (their first step re-feeds a cached token), one
    child extended by 3 given tokens; every sequence decoded to completion. Returns all token ids and logprobs."""
    sid = engine.add(prompt, SamplingParams(temperature=0, max_tokens=6))
    while engine.has_unfinished():
        engine.step()
    kids = engine.fork(sid, 2, at=len(prompt) + 4)
    while engine.has_unfinished():
        engine.step()
    engine.extend(kids[0], [5, 6, 7], max_tokens=5)
    while engine.has_unfinished():
        engine.step()
    seqs = [engine.release(s) for s in [sid] + kids]
    return [s.token_ids for s in seqs], [s.out_logprobs for s in seqs]


def test_compiled_decode_matches_eager(model, monkeypatch):
    calls = []
    run = CompiledDecode.run
    monkeypatch.setattr(CompiledDecode, "run", lambda self, *a: calls.append(len(a[0])) or run(self, *a))
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    prompts = [[3, 9, 27, 81, 50], [11], list(range(20, 42)), [7, 7, 7]]
    max_tokens = [SamplingParams(temperature=0, max_tokens=n) for n in (9, 3, 14, 6)]  # the batch shrinks to 1
    outs = {}
    for mode in ("off", "compile"):
        engine = LLMEngine(model, block_size=4, num_blocks=96, decode_graphs=mode)
        outs[mode] = ([o.token_ids for o in engine.generate(prompts, max_tokens)],
                      [o.logprobs for o in engine.generate(prompts, max_tokens)],
                      _tree(engine, [1, 2, 3, 4, 5, 6]))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert outs["compile"][0] == outs["off"][0]
    assert outs["compile"][2][0] == outs["off"][2][0]
    for a, b in ((outs["compile"][1], outs["off"][1]), (outs["compile"][2][1], outs["off"][2][1])):
        for x, y in zip(a, b):
            assert max(abs(u - v) for u, v in zip(x, y)) < 1e-4
    assert 1 in calls and max(calls) == 4  # batches of 4 down to 1 went through the compiled step
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # ... all of them through one graph


def test_compile_mode_is_validated(model):
    with pytest.raises(ValueError, match="decode_graphs.*compile"):
        LLMEngine(model, block_size=4, num_blocks=8, decode_graphs="jit")
