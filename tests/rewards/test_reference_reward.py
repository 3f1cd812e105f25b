"""`reward.name: arpo` decides as the reference's `deep_research.py` does (github.com/dongguanting/ARPO,
verl_arpo_entropy/verl/utils/reward_score/), one test per rule, and `reward.strict_format` where it differs.

Every expected score below was read off the reference's `compute_score` for the same string (its validate_format,
extract_answer, last_boxed_only_string / remove_boxed and get_f1_score, in that order)."""
import pytest

from arpo.rewards import score_arpo, token_f1

THINK = "<think>plan</think>"
SEARCH = "<search>capital of france</search> <result>\nPage 1: Paris\n</result>"
PYTHON = "<python>print(2)</python> <result>\n2\n</result>"
ANSWER = "<answer>It is \\boxed{Paris}</answer>"


def both(text, truth="Paris"):
    """(reference-rule score, strict score) of `text`."""
    return score_arpo(text, truth).score, score_arpo(text, truth, strict_format=True).score


def test_a_well_formed_trajectory_scores_its_f1_plus_the_two_tool_bonus():
    assert both(THINK + SEARCH + PYTHON + ANSWER) == (pytest.approx(1.1), pytest.approx(1.1))
    assert both(THINK + SEARCH + ANSWER) == (1.0, 1.0)
    assert both(THINK + ANSWER, "London") == (0.0, 0.0)  # good format, wrong answer: 0, not -1


@pytest.mark.parametrize("text", [
    SEARCH + ANSWER,                                         # no think block at all
    "</think>" + SEARCH + ANSWER,                            # a lone </think>: counts differ
    "<think>a</think><think>b" + SEARCH + ANSWER,            # 2 opened, 1 closed
])
def test_no_think_block_or_unpaired_think_tags_is_minus_one(text):
    ref = score_arpo(text, "Paris")
    assert ref.score == -1.0 and "think" in ref.reason
    assert score_arpo(text, "Paris", strict_format=True).score == -1.0


@pytest.mark.parametrize("call", [
    "<search>capital of france</search>",                        # the call, no result
    "<python>print(2)</python>",
    "<search>capital of france</search> <result>\nPage 1: Paris",  # a result that never closes
    "<python>print(2) <result>\n2\n</result></python>",          # the result before the call's closing tag
    "<search>capital of france",                                 # the call never closes
])
def test_a_call_not_followed_by_its_result_is_minus_one(call):
    text = THINK + call + ANSWER
    ref = score_arpo(text, "Paris")
    assert ref.score == -1.0 and ("search/result" in ref.reason or "python/result" in ref.reason), ref.reason
    assert score_arpo(text, "Paris", strict_format=True).score == -1.0


def test_every_call_needs_its_own_result():
    """The reference scans on from the previous match's `</result>`: a second call with no result of its own is
    caught even when an earlier result exists."""
    text = THINK + SEARCH + "<search>again</search>" + ANSWER
    assert score_arpo(text, "Paris").score == -1.0
    assert score_arpo(THINK + SEARCH + SEARCH + ANSWER, "Paris").score == 1.0


@pytest.mark.parametrize("answer,reason", [
    ("<answer>\\boxed{Paris</answer>", "missing \\boxed{} format"),  # no closing brace anywhere in the block
    ("<answer>\\boxed{Pa{ris}</answer>", "find box error"),          # a brace, but the box's own never closes
    ("<answer>Paris</answer>", "missing \\boxed{} format"),          # no box at all
])
def test_a_box_without_its_closing_brace_is_minus_one(answer, reason):
    ref = score_arpo(THINK + answer, "Paris")
    assert ref.score == -1.0 and reason in ref.reason
    assert score_arpo(THINK + answer, "Paris", strict_format=True).score == -1.0


@pytest.mark.parametrize("text", [
    THINK + "<answer>\\boxed{a}</answer><answer>\\boxed{b}</answer>",  # two answers
    THINK + "no answer \\boxed{Paris}",
    THINK + "</answer>\\boxed{Paris}<answer>",                          # closing before opening
])
def test_not_exactly_one_answer_block_in_order_is_minus_one(text):
    assert both(text) == (-1.0, -1.0)


@pytest.mark.parametrize("pred,truth", [("yes", "yes sir"), ("no idea", "no"), ("noanswer", "no answer"),
                                        ("Yes.", "no"), ("no", "yes")])
def test_yes_no_noanswer_f1_is_zero_when_they_differ(pred, truth):
    text = THINK + f"<answer>\\boxed{{{pred}}}</answer>"
    assert token_f1(pred, truth) == 0.0
    assert both(text, truth) == (0.0, 0.0)
    assert both(text, [truth, pred]) == (1.0, 1.0)  # another acceptable truth equal to it still scores


def test_yes_no_match_and_ordinary_answers_keep_their_f1():
    assert both(THINK + "<answer>\\boxed{Yes!}</answer>", "yes") == (1.0, 1.0)
    assert both(THINK + "<answer>\\boxed{no way out}</answer>", "way out") == (pytest.approx(0.8),) * 2


# --- where strict_format decides otherwise (README "Branching, reward and call limit") -------------

@pytest.mark.parametrize("text,ref,strict", [
    # blocks nested inside think: the reference checks counts and call->result order only
    ("<think>plan " + SEARCH + "</think>" + ANSWER, 1.0, -1.0),
    # think tags in the wrong order: counts agree, so the reference passes it
    ("</think>plan<think>" + ANSWER, 1.0, -1.0),
    # text and blocks after the answer
    (THINK + ANSWER + "<think>more</think>", 1.0, -1.0),
    (THINK + ANSWER + " and more", 1.0, 1.0),  # plain text after the answer: both allow it
    # tag text inside code and results: the reference counts it as a tag, strict reads it as content
    (THINK + "<python>print('<answer>')</python> <result>\n<answer>\n</result>" + ANSWER, -1.0, 1.0),
    # a result with no call before it: the reference only checks that calls have results
    (THINK + "<result>r</result>" + ANSWER, 1.0, -1.0),
])
def test_where_strict_format_differs(text, ref, strict):
    assert both(text) == (pytest.approx(ref), pytest.approx(strict))


def test_the_tool_bonus_counts_closing_tags_anywhere_unless_strict():
    """The reference adds 0.1 when `</search>` and `</python>` occur anywhere; strict only for real call blocks."""
    text = THINK + "<python>print('</search>')</python> <result>\n</search>\n</result>" + ANSWER
    assert both(text) == (pytest.approx(1.1), 1.0)


def test_a_trajectory_past_the_call_limit_scores_minus_one_either_way():
    """`rollout.over_limit: end` ends the text at the un-run call's closing tag (the reference appends EOS there);
    `text` lets it go on to an answer, but the call still has no result, so the reference's check fails it too."""
    ended = THINK + SEARCH + "<python>print(2)</python>"
    went_on = ended + " so " + ANSWER
    assert both(ended) == (-1.0, -1.0) and both(went_on) == (-1.0, -1.0)
