"""`decode_overlap`: the next decode step is launched before `step()` returns. Every call must return what the
serial engine returns, through add / fork / extend / resume / release between steps (which drop the step launched
ahead and re-feed its tokens), on a ragged batch with greedy, seeded and top-k sampling, on both the padded
decode path (`decode_graphs="eager"`, the CUDA-graph logic without capture) and the plain one."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from arpo.engine import LLMEngine, SamplingParams  # noqa: E402
from arpo.engine.config import EngineConfig  # noqa: E402
from arpo.settings import ConfigError  # noqa: E402


def _drive(engine):
    """A fixed script of steps and changes between them; returns each call's outputs and every sequence's ids."""
    calls = []

    def steps(n):
        for _ in range(n):
            calls.append([(o.seq_id, o.token_id, o.logprob, o.finished) for o in engine.step()])

    a = engine.add([3, 9, 14, 2, 8], SamplingParams(temperature=0, max_tokens=14))
    b = engine.add([11], SamplingParams(temperature=1.0, seed=7, max_tokens=9))
    c = engine.add(list(range(20, 29)), SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=12))
    steps(3)
    d = engine.add([40, 41, 42], SamplingParams(temperature=1.0, seed=5, max_tokens=6))  # joins a running batch
    steps(2)
    kids = engine.fork(a, 2, seeds=[1, 2], params=SamplingParams(temperature=1.0, max_tokens=4))
    steps(2)
    engine.release(c)  # a sequence the step ahead feeds
    steps(4)  # b, d and the children stop on max_tokens meanwhile
    engine.extend(d, [5, 6, 7], max_tokens=3)
    engine.resume(kids[0], max_tokens=2)
    while engine.has_unfinished():
        steps(1)
    final = {sid: engine.release(sid).token_ids for sid in [a, b, d] + kids}
    return calls, final


@pytest.mark.parametrize("graphs", ["eager", "off"])
def test_same_outputs_with_and_without_overlap(model, graphs):
    runs = {}
    for overlap in ("off", "on"):
        engine = LLMEngine(model, num_blocks=64, block_size=4, decode_graphs=graphs, decode_overlap=overlap)
        runs[overlap] = _drive(engine), engine.stats
    (serial_calls, serial_final), serial_stats = runs["off"]
    (calls, final), stats = runs["on"]
    assert final == serial_final
    assert len(calls) == len(serial_calls)
    for got, want in zip(calls, serial_calls):
        assert [(s, t, f) for s, t, _, f in got] == [(s, t, f) for s, t, _, f in want]
        torch.testing.assert_close([lp for _, _, lp, _ in got], [lp for _, _, lp, _ in want], atol=1e-5, rtol=0)
    # the reordered path really ran: steps were launched ahead, and the changes between steps dropped some
    assert serial_stats["dropped_steps"] == 0
    assert stats["dropped_steps"] >= 4  # add, fork, release of a fed sequence, extend (+ resume)
    stats.pop("dropped_steps")
    serial_stats.pop("dropped_steps")
    assert stats == serial_stats  # a dropped step's writes count once, as the serial step's decode tokens


def test_generate_never_drops_and_matches_serial(model):
    prompts = [[3, 9, 14], [11], list(range(20, 31)), [40, 41]]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (5, 9, 3, 7)]
    serial = LLMEngine(model, num_blocks=64, block_size=4, decode_graphs="eager", decode_overlap="off")
    ahead = LLMEngine(model, num_blocks=64, block_size=4, decode_graphs="eager", decode_overlap="on")
    want = [c.token_ids for c in serial.generate(prompts, params)]
    assert [c.token_ids for c in ahead.generate(prompts, params)] == want
    assert ahead.stats["dropped_steps"] == 0  # finished sequences are released without touching the step ahead
    assert ahead.stats["decode_tokens"] == serial.stats["decode_tokens"]


def test_only_decode_steps_go_ahead_and_sync_drops_them(model):
    engine = LLMEngine(model, num_blocks=64, block_size=4, decode_graphs="eager", decode_overlap="on",
                       max_num_batched_tokens=4)
    serial = LLMEngine(model, num_blocks=64, block_size=4, decode_graphs="eager", decode_overlap="off",
                       max_num_batched_tokens=4)
    for e in (engine, serial):
        e.add(list(range(1, 11)), SamplingParams(temperature=0, max_tokens=4))
    assert engine.step() == serial.step() == []  # a prefill chunk; the next step is another: nothing goes ahead
    assert engine._ahead is None
    assert engine.step() == serial.step() == []
    first = engine.step()  # the prefill's last chunk samples; the next step is a decode, launched ahead
    assert engine._ahead is not None and first == serial.step()
    engine.sync()
    assert engine._ahead is None and engine.stats["dropped_steps"] == 1
    engine.sync()  # nothing ahead: no-op
    assert engine.stats["dropped_steps"] == 1
    assert engine.step() == serial.step()  # the dropped step's token, re-fed, samples the same
    assert {k: v for k, v in engine.stats.items() if k != "dropped_steps"} == \
        {k: v for k, v in serial.stats.items() if k != "dropped_steps"}


def test_resolution_and_bad_value():
    assert EngineConfig(decode_graphs="cuda").resolved_overlap("cuda") is True
    assert EngineConfig().resolved_overlap("cpu") is False
    assert EngineConfig(decode_overlap="on").resolved_overlap("cpu") is True
    with pytest.raises(ConfigError, match="decode_overlap"):
        EngineConfig(decode_overlap="sometimes")
