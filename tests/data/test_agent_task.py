"""The agent task (issue 19): splits, gold traces replayed through the real tools, distractors, tokenizer, preset."""
import json
import os
import re
from collections import Counter

import pytest

from arpo.data import agent, world
from arpo.data.agent import (AGE, ARITH, DIRECT, FACT, FACT_CALC, SOURCES, SUM, TWOHOP, agent_demo_segments,
                             agent_examples, question_split)
from arpo.data.agent_tokenizer import AGENT_TOKENIZER_PATH, build_agent_tokenizer, load_agent_tokenizer
from arpo.rewards import embedded_reward
from arpo.tools import ToolCall, format_result, parse_call

PRESET = os.path.join(os.path.dirname(agent.__file__), "..", "configs", "embedded-agent.yaml")
CALLS = {DIRECT: [], ARITH: ["python"], FACT: ["search"], TWOHOP: ["search", "search"],
         FACT_CALC: ["search", "python"], AGE: ["search", "search", "python"], SUM: ["search", "search", "python"]}
_WORD = re.compile(r"[a-z]+|[0-9]+")


@pytest.fixture(scope="module")
def preset():
    from arpo.config import load_config

    return load_config(PRESET)


@pytest.fixture(scope="module")
def tools(preset):
    """The preset's own tool executor: the real python sandbox and BM25 search over the agent corpus."""
    from arpo.build import build_tools

    ex = build_tools(preset)
    yield ex
    ex.close()


def _sample():
    """Every held-out question and a spread of training ones, each kind present."""
    return agent_examples(128, "heldout", seed=0) + agent_examples(60, "train", seed=5)


def test_splits_never_overlap_and_are_fixed_by_question():
    train = agent_examples(3000, "train", seed=1)
    held = agent_examples(128, "heldout", seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(question_split(e) == "train" for e in train) and all(question_split(e) == "heldout" for e in held)
    assert len({e.prompt for e in held}) == len(held)  # held-out: each question once
    assert set(Counter(e.data_source for e in held)) == set(SOURCES)
    assert agent_examples(50, "train", seed=2) == agent_examples(50, "train", seed=2)
    assert agent_examples(50, "train", seed=2) != agent_examples(50, "train", seed=3)
    # a different seed draws a different held-out order from the same fixed split
    pool = {e.prompt for e in agent._search_questions() if question_split(e) == "heldout"}
    for seed in (0, 4):
        assert {e.prompt for e in agent_examples(128, "heldout", seed=seed)
                if e.data_source not in (ARITH, DIRECT)} <= pool
    assert not pool & {e.prompt for e in agent._search_questions() if question_split(e) == "train"}
    with pytest.raises(ValueError, match="distinct"):
        agent_examples(20000, "heldout")
    with pytest.raises(ValueError, match="split"):
        agent_examples(1, "test")


def test_mix_follows_the_shares():
    counts = Counter(e.data_source for e in agent_examples(1000, "train", seed=0))
    assert counts == {s: round(1000 * share) for s, share in agent.MIX.items()}


def test_gold_traces_replay_through_the_real_tools_and_need_every_call(tools):
    for ex in _sample():
        segs = agent_demo_segments(ex)
        calls = [parse_call(text, ["python", "search"]) for text, trainable in segs[:-1:2]]
        assert [c.tag for c in calls] == CALLS[ex.data_source], ex.prompt
        results = [text for text, trainable in segs[1::2] if not trainable]
        assert [t for _, t in segs] == [True, False] * len(calls) + [True]
        for call, recorded in zip(calls, results):
            real = tools.run(ToolCall(call.tag, call.content, 0, 0))
            assert real.ok and format_result(real.text) == recorded, (ex.prompt, call, real.text)
        # each result brings a word or number that a later call or the answer uses and nothing before it had
        seen = set(_WORD.findall(ex.prompt))
        for k, result in enumerate(results):
            new = set(_WORD.findall(result)) - seen
            later = " ".join(text for text, trainable in segs[2 * k + 2:] if trainable)
            needed = new & set(_WORD.findall(later))
            assert needed, (ex.prompt, k, result)
            seen |= set(_WORD.findall(result)) | set(_WORD.findall(segs[2 * k][0]))
        answer_words = set(_WORD.findall(ex.answer))
        if calls:
            assert not answer_words <= set(_WORD.findall(ex.prompt)), ex.prompt  # the prompt alone cannot tell
            assert answer_words <= set(_WORD.findall(results[-1])) or ex.answer in results[-1]
        else:
            assert answer_words <= set(_WORD.findall(ex.prompt))
        assert embedded_reward("".join(t for t, _ in segs), ex.answer) == 1.0


def test_searches_return_a_distractor_next_to_the_right_passage(tools):
    for ex in _sample():
        for tool, query in ex.meta["calls"]:
            if tool != "search":
                continue
            pages = re.findall(r"^Page \d+: (.*)$", tools.run(ToolCall("search", query, 0, 0)).text, re.M)
            assert len(pages) == agent.AGENT_SEARCH_TOP_K and pages[0] == query and query not in pages[1:]


def test_bundled_agent_corpus_matches_the_facts():
    with open(world.AGENT_CORPUS_PATH) as f:
        assert [json.loads(line) for line in f] == world.agent_corpus()
    assert len({d["id"] for d in world.agent_corpus()}) == len(world.agent_corpus())


def test_tokenizer_file_matches_builder_and_round_trips_every_trace():
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(AGENT_TOKENIZER_PATH).get_vocab() == build_agent_tokenizer().get_vocab()
    tok = load_agent_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for ex in _sample():
        text = ex.prompt + "".join(t for t, _ in agent_demo_segments(ex))
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert len(tok.encode(" bramwick", add_special_tokens=False)) == 1  # words are single pieces
    assert tok.encode("1813", add_special_tokens=False) == [tok.convert_tokens_to_ids(d) for d in "1813"]


def test_preset_loads_validates_and_fits_the_gold_traces(preset):
    from arpo.build import build_tools
    from arpo.config import config_from_dict, config_to_dict, load_config
    from arpo.trainer.data import encode_prompt

    assert preset.data.embedded_task == "agent" and set(preset.tools.enabled) == {"python", "search"}
    assert config_to_dict(config_from_dict(config_to_dict(preset))) == config_to_dict(preset)
    tok = load_agent_tokenizer()
    longest = 0
    for ex in _sample():
        segs = agent_demo_segments(ex)
        assert len(encode_prompt(tok, ex.prompt, preset.data)) <= preset.data.max_prompt_tokens
        assert all(len(t) - len(format_result("")) <= preset.tools.max_result_chars for t, tr in segs if not tr)
        longest = max(longest, sum(len(tok.encode(t, add_special_tokens=False)) for t, _ in segs) + 1)
        assert len(ex.meta["calls"]) <= preset.rollout.max_tool_calls
    assert longest <= preset.rollout.max_response_tokens and longest <= preset.sft.max_tokens
    ex = build_tools(load_config(PRESET, ["tools.enabled=[search]"]))
    try:
        assert ex.run(ToolCall("search", "ilse varga", 0, 0)).text.startswith("Page 1: ilse varga\n")
    finally:
        ex.close()


def test_agent_task_reaches_sft_and_the_embedded_model(preset, tmp_path):
    from dataclasses import replace

    from arpo.build import create_embedded_model, load_tokenizer
    from arpo.trainer.data import eval_rows
    from arpo.trainer.sft import load_traces

    cfg = replace(preset, data=replace(preset.data, embedded_train_size=20, embedded_eval_size=8))
    traces = load_traces(cfg)
    assert len(traces) == 20 and all(tr["segments"][-1][0].startswith("<answer>") for tr in traces)
    assert {r["data_source"] for r in eval_rows(cfg)} <= set(SOURCES)
    small = replace(cfg.model, embedded_hidden_size=16, embedded_heads=2, embedded_kv_heads=1,
                    embedded_layers=1, embedded_intermediate_size=16)
    path = create_embedded_model(small, str(tmp_path / "m"), task="agent")
    assert len(load_tokenizer(path)) == len(load_agent_tokenizer())
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["vocab_size"] == len(load_agent_tokenizer())


def test_sft_draws_its_own_trace_count_from_the_training_split(preset):
    """`sft.embedded_traces` sets how many demonstrations SFT draws (default: the RL questions' count); all of them
    are training-split questions, and the cached default search gives the same results as a fresh tool."""
    from dataclasses import replace

    from arpo.data.agent import agent_search_tool, question_split
    from arpo.data.embedded import Example
    from arpo.trainer.sft import load_traces

    small = replace(preset, data=replace(preset.data, embedded_train_size=12))
    assert len(load_traces(small)) == 12
    more = replace(small, sft=replace(small.sft, embedded_traces=300))
    traces = load_traces(more)
    assert len(traces) == 300
    prompts = {tr["prompt"] for tr in traces}
    assert len(prompts) > 200  # fresh arithmetic and direct questions, search kinds cycling through their pool
    held = {ex.prompt for ex in agent.agent_examples(128, "heldout", 0)}
    assert not prompts & held
    ex = next(e for e in agent.agent_examples(50, "train", 3) if e.data_source == TWOHOP)
    assert question_split(ex) == "train"
    fresh = agent_demo_segments(Example(ex.prompt, ex.answer, ex.data_source, ex.meta), search=agent_search_tool())
    assert agent_demo_segments(ex) == fresh
