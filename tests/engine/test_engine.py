"""LLMEngine vs Hugging Face generate, and the fork / extend / preemption / seeding contracts."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from arpo.engine import CacheTooSmallError, LLMEngine, SamplingParams  # noqa: E402
from arpo.model import Qwen2Model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = {
    "gqa2-tied": dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, theta=10000.0),
    "gqa7-untied": dict(vocab_size=173, hidden_size=56, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=False, theta=5e5),
}


def _hf_model(name: str, seed: int = 0):
    kw = dict(CONFIGS[name])
    theta = kw.pop("theta")
    cfg = transformers.Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                   rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger random weights than the default init: peaked, seed-sensitive distributions
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param)
    hf.save_pretrained(path)
    ours = Qwen2Model.from_pretrained(str(path), dtype=torch.float32, device=DEVICE)
    return hf, ours


def _prompts(vocab: int, lens, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(model, **kw):
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    return LLMEngine(model, **kw)


def test_greedy_ragged_batch_matches_hf_generate(models):
    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (5, 1, 12, 7, 4))
    engine = _engine(ours, max_num_batched_tokens=9)  # forces chunked prefill mixed with decodes
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf, prompt, 10)
        assert out.finish_reason == "length" and len(out.logprobs) == len(out.entropies) == 10
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("graphs", ["eager"] + (["cuda"] if torch.cuda.is_available() else []))
def test_padded_decode_graph_path_matches(models, graphs):
    """Decode steps through the static, padded buffers the CUDA graphs replay give the same tokens."""
    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (5, 1, 12))
    params = SamplingParams(temperature=0, max_tokens=6)
    plain = _engine(ours).generate(prompts, params)
    padded = _engine(ours, decode_graphs=graphs, max_model_len=64).generate(prompts, params)
    assert [o.token_ids for o in padded] == [o.token_ids for o in plain]
    for a, b in zip(padded, plain):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.parametrize("graphs", ["eager"] + (["cuda"] if torch.cuda.is_available() else []))
def test_graph_path_samples_like_the_plain_path(models, graphs):
    """Seeded sampling through the graphs' staged inputs: unfiltered rows come from the captured sampler, a step
    with top-k/top-p rows re-samples from the graph's logits; both give the plain path's tokens and stats."""
    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (5, 1, 12, 7))
    params = [SamplingParams(temperature=1.0, max_tokens=6, seed=11),
              SamplingParams(temperature=0.7, max_tokens=6, seed=12),
              SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=1.0, max_tokens=6, seed=13)]
    for plist in (params, params[:3] + [SamplingParams(temperature=1.0, top_p=0.8, top_k=5, max_tokens=6, seed=13)]):
        plain = _engine(ours).generate(prompts, plist)
        padded = _engine(ours, decode_graphs=graphs, max_model_len=64).generate(prompts, plist)
        for a, b in zip(padded, plain):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs + a.entropies, b.logprobs + b.entropies)) < 1e-4


def test_logprobs_and_entropies_match_hf_scores(models):
    hf, ours = models
    prompt = _prompts(hf.config.vocab_size, (6,))[0]
    out = _engine(ours).generate([prompt], SamplingParams(temperature=0, max_tokens=5))[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(full).logits[0].double(), -1)
    for i, tok in enumerate(out.token_ids):
        row = logp[len(prompt) - 1 + i]
        assert abs(out.logprobs[i] - float(row[tok])) < 1e-4
        assert abs(out.entropies[i] - float(-(row.exp() * row).sum())) < 1e-4


def test_fork_shares_blocks_and_continues_like_a_fresh_sequence(models):
    hf, ours = models
    engine = _engine(ours)
    prompt = _prompts(hf.config.vocab_size, (9,))[0]
    sid = engine.add(prompt, SamplingParams(temperature=0, max_tokens=8))
    while engine.has_unfinished():
        engine.step()
    parent = engine.sequence(sid)
    at = len(prompt) + 5
    parent_table = engine.block_manager.block_table(sid)
    children = engine.fork(sid, 2, at=at)
    for c in children:  # the full blocks before `at` are the parent's own
        table = engine.block_manager.block_table(c)
        full = at // engine.block_size
        assert table[:full] == parent_table[:full]
    while engine.has_unfinished():
        engine.step()
    fresh = engine.generate([parent.token_ids[:at]], SamplingParams(temperature=0, max_tokens=8))[0]
    for c in children:
        child = engine.sequence(c)
        assert child.token_ids[:at] == parent.token_ids[:at]
        assert child.token_ids[at:] == fresh.token_ids[:len(child.token_ids) - at]
    assert engine.stats["block_copies"] >= 1  # the partial block at `at` was copied on write


def test_extend_then_decode_equals_decoding_the_concatenation(models):
    hf, ours = models
    engine = _engine(ours)
    prompt = _prompts(hf.config.vocab_size, (7,))[0]
    tool = _prompts(hf.config.vocab_size, (6,), seed=5)[0]
    sid = engine.add(prompt, SamplingParams(temperature=0, max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    engine.extend(sid, tool, max_tokens=3 + 6)
    while engine.has_unfinished():
        engine.step()
    seq = engine.release(sid)
    head = seq.token_ids[:len(prompt) + 3 + len(tool)]
    assert seq.out_sampled == [True] * 3 + [False] * len(tool) + [True] * 6
    assert seq.token_ids[len(head):] == _hf_greedy(hf, head, 6)


def test_preemption_recomputes_without_changing_results(models):
    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (6, 9, 3, 8))
    roomy = _engine(ours).generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    tight = _engine(ours, num_blocks=12)
    outs = tight.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert tight.stats["preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]


def test_seeded_sampling_is_batch_invariant(models):
    _, ours = models
    prompts = _prompts(ours.config.vocab_size, (4, 8, 5))
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=1234)
    alone = _engine(ours).generate([prompts[1]], params)[0]
    crowd = _engine(ours).generate(prompts, [SamplingParams(temperature=0.7, max_tokens=6, seed=7), params,
                                             SamplingParams(max_tokens=6)])[1]
    assert alone.token_ids == crowd.token_ids
    other = _engine(ours).generate([prompts[1]], SamplingParams(temperature=1.0, max_tokens=6, seed=99))[0]
    assert other.token_ids != alone.token_ids


def test_resume_continues_a_stopped_sequence(models):
    hf, ours = models
    engine = _engine(ours)
    prompt = _prompts(hf.config.vocab_size, (5,))[0]
    sid = engine.add(prompt, SamplingParams(temperature=0, max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="only a stopped sequence"):
        engine.resume(sid, max_tokens=5)
        engine.extend(sid, [1])
    while engine.has_unfinished():
        engine.step()
    assert engine.release(sid).token_ids[len(prompt):] == _hf_greedy(hf, prompt, 5)


def test_stop_tokens_and_bad_input(models):
    _, ours = models
    engine = _engine(ours)
    prompt = _prompts(ours.config.vocab_size, (5,))[0]
    first = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0].token_ids
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[first[1]]))[0]
    assert out.token_ids == first[:2] and out.finish_reason == "stop" and out.stop_reason == first[1]
    with pytest.raises(ValueError, match="out of range"):
        engine.add([ours.config.vocab_size + 3])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(KeyError, match="unknown sequence"):
        engine.fork(12345)


def test_cache_too_small_is_a_clear_error(models):
    _, ours = models
    engine = _engine(ours, num_blocks=2, block_size=2)
    with pytest.raises(CacheTooSmallError, match="cannot hold"):
        engine.generate([list(range(1, 10))], SamplingParams(temperature=0, max_tokens=2))


def test_greedy_on_the_triton_kernels(models, monkeypatch):
    """The same engine run through the Triton kernels (compiled on CUDA, interpreted on the CPU)."""
    monkeypatch.setenv("ARPO_KERNEL_BACKEND", "triton")
    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (5, 2))
    outs = _engine(ours).generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf, prompt, 3)


def test_stop_string_precheck_changes_nothing(monkeypatch):
    """The per-token pre-check (a stop string can only end in a token whose own text holds its last character)
    ends every sequence exactly where the full tail decode alone would."""
    from arpo.engine import llm_engine
    from arpo.rollout.toy_policy import tool_chain_policy

    model, tok = tool_chain_policy("python", seed=0, device="cpu", noise=0.3)
    prompts = [tok.encode(q, add_special_tokens=False) for q in ("Q: 12*34+5=?", "Q: 7*8+9=?", "Q: 1+1=?")]
    stops = ("</python>", "=", "42")  # all pre-checkable
    params = [SamplingParams(temperature=1.0, max_tokens=40, stop=stops, seed=s) for s in range(12)]

    def run():
        engine = LLMEngine(model, tokenizer=tok, block_size=8, num_blocks=512, max_model_len=256)
        outs = engine.generate([prompts[i % 3] for i in range(12)], params)
        return [(o.token_ids, o.finish_reason, o.stop_reason) for o in outs]

    may = llm_engine._may_complete
    assert not may("abc", stops) and may("x>", stops) and may("2", stops)
    assert may("abc", ("é",)) and may("abc", ("a \n",))  # non-ASCII or whitespace last characters: always maybe
    fast = run()
    assert any(reason == "stop" for _, reason, _ in fast)
    monkeypatch.setattr(llm_engine, "_may_complete", lambda piece, stops: True)
    assert run() == fast


@pytest.mark.parametrize("num_blocks", [12, 40])  # tight enough to preempt; roomy (forks take the shortcut)
def test_all_decode_fast_path_schedules_like_the_general_loop(models, monkeypatch, num_blocks):
    """The scheduler's steady-state shortcut (every active sequence a running decode, a free block each) gives
    the same chunks, slots and copy-on-write copies as the general loop, step by step, through forks at partial
    blocks (re-fed tokens, copies), extends and a cache small enough to preempt."""
    from arpo.engine.scheduler import Scheduler

    hf, ours = models
    prompts = _prompts(hf.config.vocab_size, (9, 3, 6))

    def trace(fast: bool):
        if not fast:
            monkeypatch.setattr(Scheduler, "_all_decodes", lambda self, plan, order: False)
        engine = _engine(ours, num_blocks=num_blocks)
        steps, taken = [], []
        schedule = engine.scheduler.schedule

        def recording(active):
            plan = schedule(active)
            steps.append([(c.seq.seq_id, c.start, c.num_tokens, list(c.slots), c.samples) for c in plan.chunks]
                         + [tuple(plan.copies), len(plan.preempted)])
            return plan
        engine.scheduler.schedule = recording
        if fast:
            original = Scheduler._all_decodes

            def counting(self, plan, order):
                out = original(self, plan, order)
                taken.append(out)
                return out
            monkeypatch.setattr(Scheduler, "_all_decodes", counting)
        ids = [engine.add(p, SamplingParams(temperature=1.0, max_tokens=10, seed=i)) for i, p in enumerate(prompts)]
        done = {}

        def drain():  # finished sequences give their blocks back, except the one extended later
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished and out.seq_id != ids[1]:
                        done[out.seq_id] = engine.release(out.seq_id).token_ids
        for _ in range(4):
            engine.step()
        kids = engine.fork(ids[0], 2, at=engine.sequence(ids[0]).num_tokens - 2)  # mid-block: re-fed, CoW
        drain()
        engine.extend(ids[1], [5, 6, 7], max_tokens=14)
        drain()
        monkeypatch.undo()
        return steps, [done.get(i) for i in ids + kids] + [engine.sequence(ids[1]).token_ids], engine.stats, taken

    fast_steps, fast_tokens, fast_stats, taken = trace(True)
    slow_steps, slow_tokens, slow_stats, _ = trace(False)
    assert any(taken) and not all(taken)  # both paths ran in the fast trace
    assert fast_steps == slow_steps and fast_tokens == slow_tokens and fast_stats == slow_stats
    assert fast_stats["block_copies"] > 0 and fast_stats["refed_tokens"] > 0
    assert (fast_stats["preemptions"] > 0) == (num_blocks == 12)
