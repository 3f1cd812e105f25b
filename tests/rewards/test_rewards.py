"""Format rules, answer comparison and the reward functions."""
import pytest

from arpo.rewards import (arpo_reward, check_format, embedded_reward, exact_match, extract_boxed, load_reward,
                          math_equal, normalize_answer, score_arpo, score_embedded, token_f1)

GOOD = ("<think>plan</think><search>capital of france</search> <result>\nPage 1: Paris\n</result>"
        "<python>print(2)</python> <result>\n2\n</result><answer>It is \\boxed{Paris}</answer>")


@pytest.mark.parametrize("text,reason", [
    ("<think>x<answer>\\boxed{a}</answer>", "unpaired <think>"),
    ("<answer>\\boxed{a}</answer><answer>\\boxed{b}</answer>", "exactly one <answer>"),
    ("just text \\boxed{a}", "exactly one <answer>"),
    ("</think>x<think><answer>\\boxed{a}</answer>", "without a matching"),
    ("<think><search>q</search></think><answer>\\boxed{a}</answer>", "opened inside"),
    ("<think>t</think><result>r</result><answer>\\boxed{a}</answer>", "not directly after a tool call"),
    ("<think>t</think><answer>\\boxed{a}</answer><search>q</search>", "after the answer"),
    ("<think>t</think><answer>a</answer>", "no \\boxed"),
])
def test_bad_formats_score_minus_one_with_reason(text, reason):
    assert reason in check_format(text).reason
    res = score_arpo(text, "a", strict_format=True)
    assert res.score == -1.0 and reason in res.reason


def test_tags_inside_tool_results_are_ignored():
    text = "<python>print('<answer>')</python> <result>\n<answer>\n</result><answer>\\boxed{x}</answer>"
    assert check_format(text).ok


def test_extract_boxed_nested_and_last():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed {a{b}c}") == "a{b}c"
    assert extract_boxed("\\boxed{unclosed") is None and extract_boxed("none") is None


def _f1_reference(pred, gt):
    p, g = normalize_answer(pred).split(), normalize_answer(gt).split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


@pytest.mark.parametrize("pred,gt", [("the cat sat", "cat sat down"), ("Paris!", "paris"), ("a b b", "b b c"),
                                     ("nothing", "else"), ("New York City", "new york")])
def test_token_f1_against_reference(pred, gt):
    assert token_f1(pred, gt) == pytest.approx(_f1_reference(pred, gt))
    assert token_f1(pred, ["zzz", gt]) == pytest.approx(_f1_reference(pred, gt))
    assert exact_match(pred, gt) == float(normalize_answer(pred) == normalize_answer(gt))


@pytest.mark.parametrize("a,b,equal", [("\\frac{1}{2}", "0.5", True), ("2\\sqrt{2}", "\\sqrt{8}", True),
                                       ("3", "4", False), ("x^2+2x+1", "(x+1)^2", True), ("1,000", "1000", True)])
def test_math_equal(a, b, equal):
    assert math_equal(a, b) is equal
    assert math_equal(a, b, use_math_verify=False) is equal  # the sympy fallback agrees


def test_math_equal_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda ab: math_equal(*ab), [("\\frac{1}{2}", "0.5"), ("3", "4")])) == [True, False]


def test_arpo_reward_f1_math_and_tool_bonus():
    assert arpo_reward(GOOD, "Paris") == pytest.approx(1.1)  # both tools used
    one_tool = GOOD.replace("<python>print(2)</python> <result>\n2\n</result>", "")
    assert arpo_reward(one_tool, "Paris") == pytest.approx(1.0)
    assert arpo_reward(one_tool, "Paris France") == pytest.approx(_f1_reference("Paris", "Paris France"))
    assert arpo_reward(one_tool, "London") == 0.0
    math = "<think>t</think><python>print(1/2)</python> <result>\n0.5\n</result><answer>\\boxed{\\frac{1}{2}}</answer>"
    assert arpo_reward(math, "0.5", data_source="math") == 0.0  # the reference: token F1 only
    assert arpo_reward(math, "0.5", data_source="math", math_equivalence=True) == 1.0
    assert arpo_reward(math, "0.5", data_source="hotpotqa") == 0.0


@pytest.mark.parametrize("text,score", [
    ("<python>print(237*82+98)</python> <result>\n19532\n</result><answer>19532</answer>", 1.0),
    ("<answer>19532</answer>", 1.0),
    ("<answer> 019532 </answer>", 1.0),
    ("<python>print(237*82+98)</python> <result>\n19532\n</result><answer>19533</answer>", 0.0),
    ("<python>print(1)</python> <result>\n1\n</result>", -1.0),
    ("<answer>19532</answer>trailing", -1.0),
    ("<answer>19532</answer><answer>19532</answer>", -1.0),
    ("<python>print(1)<answer>19532</answer>", -1.0),
])
def test_embedded_reward(text, score):
    assert embedded_reward(text, "19532") == score
    assert (score_embedded(text, "19532").reason != "") == (score == -1.0)


def test_embedded_reward_text_answers():
    assert embedded_reward("<answer>Pelloway.</answer>", "pelloway") == 1.0


def test_load_reward():
    assert load_reward("arpo") is arpo_reward
    assert load_reward("arpo.rewards.reward:embedded_reward") is embedded_reward
    assert load_reward("f1")("<answer>\\boxed{x y}</answer>", "x") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("bleu")
    with pytest.raises(ValueError, match="no attribute"):
        load_reward("arpo.rewards.reward:nope")
