"""Reward functions `reward(completion_text, ground_truth, **row) -> float`, loadable by name or dotted path.

* `arpo` (the reference's `deep_research.py`, ../shared/ARPO.md §4): −1 for a bad format by the reference's own
  checks (`reference_format.py`); otherwise the token F1 of the boxed answer (0 when either side is yes / no /
  noanswer and they differ), plus 0.1 when that is > 0 and the completion holds both `</search>` and `</python>`.
  Options: `strict_format` judges the format by our block grammar instead (`format.py`: no nesting, answer last,
  tag text inside code and results is content; with the reference's think-block and call→result rules added) and
  counts a tool as used only when it was a real call block (a box that never closes is −1 in both);
  `math_equivalence` scores a math data source's answer 1.0 when it is mathematically equal to the truth
  (math-verify, else sympy) — the reference has F1 only. README "Branching, reward and call limit" lists
  where the two differ.
* `embedded` (the default CLI task, whose answers are plain: `<answer>5541</answer>`): −1 when the tags are
  unpaired or out of order, the answer block is missing or repeated, or anything but whitespace follows it;
  1 when the answer equals the ground truth (numbers compared as integers, text after normalisation); else 0.
  No tool bonus: the arithmetic needs only python, and a correct answer is what the tiny model must learn.
* `f1`, `exact_match`: the bare metrics on the boxed answer (or the whole answer block when there is no box).

The built-ins check the format of the run's tool protocol: the run builder passes `tool_protocol=` (`tags`, or
`hermes`: `<tool_call>`/`<tool_response>` blocks, see `arpo.rewards.format`).

`score(...)` returns a `RewardResult` with the reason a trajectory got −1, for logging; the plain functions
return its float.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

from arpo.rewards.answer import exact_match, extract_boxed, math_equal, normalize_answer, token_f1
from arpo.rewards.format import FormatCheck, check_format
from arpo.rewards.reference_format import check_reference_format

MATH_SOURCES = ("math", "gsm8k", "aime", "amc", "olympiad", "numina", "deepscaler", "svamp", "asdiv", "tabmwp")
TOOL_BONUS = 0.1


@dataclass(frozen=True)
class RewardResult:
    score: float
    reason: str = ""  # why the format failed ("" when it passed)
    answer: str = ""  # the extracted answer


def is_math_source(data_source: str) -> bool:
    source = (data_source or "").lower()
    return any(name in source for name in MATH_SOURCES)


def score_arpo(completion: str, ground_truth, data_source: str = "", *, strict_format: bool = False,
               math_equivalence: bool = False, tool_protocol: str = "tags", **row) -> RewardResult:
    """The reference's deep_research.py decisions by default; `strict_format` (and every protocol other than
    `tags`, which the reference's checks do not know) applies our block grammar."""
    if strict_format or tool_protocol != "tags":
        fmt = check_format(completion, require_boxed=True, require_think=True, require_results=True,
                           protocol=tool_protocol)
        answer = extract_boxed(fmt.answer) if fmt.ok else ""
        if answer is None:  # `\boxed{` whose braces never close: −1, as in the reference
            fmt = FormatCheck(False, "\\boxed{ without its closing brace")
    else:
        fmt = check_reference_format(completion)
        answer = fmt.answer
    if not fmt.ok:
        return RewardResult(-1.0, fmt.reason)
    score = token_f1(answer, ground_truth)
    if math_equivalence and is_math_source(data_source) and math_equal(answer, ground_truth):
        score = 1.0
    if score > 0 and {"search", "python"} <= fmt.tools_used:
        score += TOOL_BONUS
    return RewardResult(score, "", answer)


def _same_answer(answer: str, ground_truth) -> bool:
    truths = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    for gt in map(str, truths):
        if re.fullmatch(r"\s*-?\d+\s*", answer) and re.fullmatch(r"\s*-?\d+\s*", gt):
            if int(answer) == int(gt):
                return True
        elif normalize_answer(answer) == normalize_answer(gt) and normalize_answer(gt):
            return True
    return False


def score_embedded(completion: str, ground_truth, tool_protocol: str = "tags", **row) -> RewardResult:
    fmt = check_format(completion, require_boxed=False, protocol=tool_protocol)
    if not fmt.ok:
        return RewardResult(-1.0, fmt.reason)
    if completion.rstrip().rsplit("</answer>", 1)[1].strip():
        return RewardResult(-1.0, "text after </answer>", fmt.answer)
    answer = fmt.answer.strip()
    return RewardResult(1.0 if _same_answer(answer, ground_truth) else 0.0, "", answer)


def _answer_text(completion: str, tool_protocol: str = "tags") -> str:
    fmt = check_format(completion, require_boxed=False, protocol=tool_protocol)
    text = fmt.answer if fmt.answer else completion
    return extract_boxed(text) or text


def arpo_reward(completion: str, ground_truth, **row) -> float:
    return score_arpo(completion, ground_truth, **row).score


REWARD_OPTIONS = {"arpo": ("strict_format", "math_equivalence")}  # keyword options a built-in reward takes


def embedded_reward(completion: str, ground_truth, **row) -> float:
    return score_embedded(completion, ground_truth, **row).score


def f1_reward(completion: str, ground_truth, **row) -> float:
    return token_f1(_answer_text(completion, row.get("tool_protocol", "tags")), ground_truth)


def exact_match_reward(completion: str, ground_truth, **row) -> float:
    return exact_match(_answer_text(completion, row.get("tool_protocol", "tags")), ground_truth)


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {
    "arpo": arpo_reward, "embedded": embedded_reward, "f1": f1_reward, "exact_match": exact_match_reward,
}


def load_reward(spec: str, **options) -> Callable[..., float]:
    """A reward function from a built-in name (arpo, embedded, f1, exact_match) or `pkg.module:function`.
    `options` (e.g. strict_format=True) are bound into a built-in reward that takes them and ignored by the
    others, so one config section serves every reward."""
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
        bound = {k: v for k, v in options.items() if k in REWARD_OPTIONS.get(spec, ())}
        return functools.partial(fn, **bound) if bound else fn
    if ":" not in spec and "." not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN_REWARDS)} or 'pkg.module:function'")
    from arpo.tools.registry import import_object

    fn = import_object(spec)
    if not callable(fn):
        raise TypeError(f"reward {spec!r} is not callable")
    return fn
