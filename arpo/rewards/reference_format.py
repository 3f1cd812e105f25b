"""The reference's format check and boxed-answer extraction (`verl/utils/reward_score/deep_research.py` of
github.com/dongguanting/ARPO), decision for decision: what `reward.name: arpo` uses unless `reward.strict_format`.

A completion passes when (the reference's `validate_format`, in its order):
1. `<think>` and `</think>` occur equally often, and at least once (counts only: order is not checked);
2. `<answer>` and `</answer>` occur exactly once each, the opening one first;
3. every `<search>` (then every `<python>`), scanning on from the previous match's `</result>`, is followed by its
   closing tag, then a `<result>`, then a `</result>`, in that order;
4. the answer block (from `<answer>` up to `</answer>`) holds `\\boxed{` and a `}` somewhere.
Then the answer is the last `\\boxed` of the answer block with its braces matched (`last_boxed_only_string`), and a
`\\boxed{` without its closing brace is −1 too (`remove_boxed` raises there). Tag text counts wherever it is —
inside code, a tool result or the answer — and text after the answer is allowed.

`arpo.rewards.format.check_format` (strict mode) parses blocks instead; README "Branching, reward and call limit"
lists where they differ.
"""
from __future__ import annotations

from arpo.rewards.format import FormatCheck

TOOL_TAGS = ("search", "python")


def _calls_have_results(text: str, tag: str) -> str:
    """'' when every `<tag>` is followed by `</tag>`, `<result>`, `</result>` in order, else the reason."""
    pos = 0
    while True:
        start = text.find(f"<{tag}>", pos)
        if start == -1:
            return ""
        result = text.find("<result>", start)
        end = text.find(f"</{tag}>", start)
        result_end = text.find("</result>", result)  # from -1: the last character, as the reference does
        if -1 in (result, end, result_end):
            return f"{tag}/result tags are incomplete"
        if not start < end < result < result_end:
            return f"{tag}/result tags are nested in the wrong order"
        pos = result_end


def last_boxed(text: str) -> str | None:
    """`\\boxed{...}` (braces matched) from the last `\\boxed` on, or `\\boxed X` up to a `$` for the space form;
    None when the braces do not close. The reference's `last_boxed_only_string`, `\\fbox` fallback included."""
    idx = text.rfind("\\boxed")
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx:i + 1]
    return None


def unbox(boxed: str | None) -> str | None:
    """The content of `last_boxed`'s result, or None where the reference's `remove_boxed` raises."""
    if boxed is None:
        return None
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if not boxed.startswith("\\boxed{") or not boxed.endswith("}"):
        return None
    return boxed[len("\\boxed{"):-1]


def check_reference_format(text: str) -> FormatCheck:
    """The reference's verdict on `text`; `answer` is the unboxed answer, `tools_used` the tools whose closing
    tag occurs anywhere (the reference's test for its +0.1 bonus)."""
    if text.count("<think>") != text.count("</think>"):
        return FormatCheck(False, "<think> </think> not paired")
    if text.count("<think>") == 0:
        return FormatCheck(False, "<think> or </think> not found")
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return FormatCheck(False, "<answer> or </answer> not found")
    for tag in TOOL_TAGS:
        reason = _calls_have_results(text, tag)
        if reason:
            return FormatCheck(False, reason)
    start, end = text.find("<answer>"), text.find("</answer>")
    if start > end:
        return FormatCheck(False, "<answer> must be before </answer>")
    block = text[start:end]
    if "\\boxed{" not in block or "}" not in block:
        return FormatCheck(False, "answer is missing \\boxed{} format")
    inner = text.strip()
    inner = inner[inner.find("<answer>") + len("<answer>"):inner.find("</answer>")]
    answer = unbox(last_boxed(inner))
    if answer is None:
        return FormatCheck(False, "find box error: \\boxed{ without its closing brace")
    used = frozenset(tag for tag in TOOL_TAGS if f"</{tag}>" in text)
    return FormatCheck(True, "", answer, used)
