"""The embedded task: questions, splits, demonstrations, bundled corpus and character tokenizer."""
import json

import pytest

from arpo.data import (ARITH, LOOKUP, arith_examples, build_char_tokenizer, demo_segments, demo_text,
                       embedded_examples, load_embedded_tokenizer, lookup_examples, split_of, world)
from arpo.data.char_tokenizer import TOKENIZER_PATH, VOCAB, unknown_chars
from arpo.rewards import embedded_reward
from arpo.tools import format_result, parse_call


def test_arith_questions_follow_calibration_and_are_seeded():
    exs = arith_examples(200, "train", seed=3)
    assert exs == arith_examples(200, "train", seed=3) and exs != arith_examples(200, "train", seed=4)
    assert len({e.prompt for e in exs}) == 200
    for e in exs:
        a, b, c = e.meta["a"], e.meta["b"], e.meta["c"]
        assert 100 <= a <= 999 and 10 <= b <= 99 and 1 <= c <= 99
        assert e.prompt == f"Q: {a}*{b}+{c}=?" and e.answer == str(a * b + c) and e.data_source == ARITH


def test_splits_are_disjoint_and_fixed_by_question():
    train = {e.prompt for e in arith_examples(500, "train", seed=0)}
    held = {e.prompt for e in arith_examples(64, "heldout", seed=0)}
    assert not train & held and all(split_of(p) == "heldout" for p in held)
    lt, lh = lookup_examples("train"), lookup_examples("heldout")
    assert lh and not {e.prompt for e in lt} & {e.prompt for e in lh}
    assert len(lt) + len(lh) == 4 * len(world.PEOPLE)
    with pytest.raises(ValueError, match="split"):
        arith_examples(1, "test")


def test_arith_demo_matches_tool_protocol_and_scores_one():
    ex = arith_examples(1, seed=7)[0]
    segs = demo_segments(ex)
    assert [t for _, t in segs] == [True, False, True]
    call = parse_call(segs[0][0], ["python"])
    assert call.content == f"print({ex.meta['a']}*{ex.meta['b']}+{ex.meta['c']})"
    assert segs[1][0] == format_result(ex.answer)
    assert embedded_reward(demo_text(ex), ex.answer) == 1.0


def test_lookup_demos_search_the_right_passages_and_score_one():
    for ex in lookup_examples("train")[:12] + lookup_examples("heldout"):
        segs = demo_segments(ex)
        results = [text for text, trainable in segs if not trainable]
        for query, result in zip(ex.meta["queries"], results):
            assert result.startswith(format_result("")[:-len("\n</result>")] + f"Page 1: {query}\n")
        assert ex.answer in results[-1] and ex.data_source == LOOKUP
        assert embedded_reward(demo_text(ex), ex.answer) == 1.0


def test_mixture():
    mix = embedded_examples(40, seed=1, lookup_fraction=0.25)
    assert sum(e.data_source == LOOKUP for e in mix) == 10 and len(mix) == 40
    with pytest.raises(ValueError, match="lookup_fraction"):
        embedded_examples(4, lookup_fraction=2)


def test_bundled_corpus_matches_the_facts():
    with open(world.CORPUS_PATH) as f:
        assert [json.loads(line) for line in f] == world.corpus()
    assert len(world.corpus()) == 50


def test_tokenizer_file_matches_builder_and_has_54_symbols():
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(TOKENIZER_PATH).get_vocab() == build_char_tokenizer().get_vocab()
    tok = load_embedded_tokenizer()
    assert len(tok) == len(VOCAB) == 54
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_tokenizer_round_trips_every_demo_one_char_per_token():
    tok = load_embedded_tokenizer()
    exs = arith_examples(20, seed=2) + lookup_examples("heldout")
    for ex in exs:
        text = ex.prompt + demo_text(ex)
        assert unknown_chars(text) <= {"P"}  # only the capital of the reference's "Page i:" falls to <unk>
        ids = tok.encode(text.replace("Page", "page"), add_special_tokens=False)
        assert len(ids) == len(text) and tok.decode(ids) == text.replace("Page", "page")
    ids = tok.encode("Page<eos>", add_special_tokens=False)
    assert ids[0] == tok.unk_token_id and ids[-1] == tok.eos_token_id
