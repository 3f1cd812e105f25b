"""The strict format rules for a completed trajectory (`reward.strict_format`, and the `embedded` reward), with the
reason a trajectory fails them; the reference's own rules are `reference_format.py`.

The reference gives −1 for: unpaired tags, not exactly one `<answer>`, tags out of order, no `\\boxed{}`. Here
"in order" means the tags form a flat sequence of blocks (`<think>…</think>`, `<search>…</search>`,
`<python>…</python>`, `<result>…</result>`, `<answer>…</answer>`) with no nesting, every `<result>` directly
after a tool call, and the answer block last. Tag-like text inside code or a tool's output is content, not a
tag. The reason string is for logs and metrics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TAGS = ("think", "search", "python", "result", "answer")
TOOL_TAGS = ("search", "python")
_VERBATIM = ("python", "result")
_TAG = re.compile(r"<(/?)(" + "|".join(TAGS) + r")>")


@dataclass(frozen=True)
class FormatCheck:
    ok: bool
    reason: str = ""
    answer: str = ""  # the text inside <answer>...</answer> when there is exactly one
    tools_used: frozenset = frozenset()


def _tags(text: str) -> list[tuple[bool, str, int, int]]:
    """(closing, name, start, end) of each tag, ignoring tag-like text inside code and tool output."""
    tags, verbatim = [], None  # inside <python> or <result>, only the matching close tag counts
    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if verbatim and not (closing and name == verbatim):
            continue
        verbatim = name if name in _VERBATIM and not closing else None
        tags.append((closing, name, m.start(), m.end()))
    return tags


def check_format(text: str, require_boxed: bool = True, require_think: bool = False,
                 require_results: bool = False) -> FormatCheck:
    """The block grammar above; `require_think`: at least one think block; `require_results`: every tool call
    directly followed by its result (both the reference's rules, which strict `arpo` adds)."""
    tags = _tags(text)
    for name in TAGS:
        opens = sum(1 for closing, n, *_ in tags if n == name and not closing)
        closes = sum(1 for closing, n, *_ in tags if n == name and closing)
        if opens != closes:
            return FormatCheck(False, f"unpaired <{name}> tags ({opens} open, {closes} close)")
    n_answers = sum(1 for closing, n, *_ in tags if n == "answer" and not closing)
    if n_answers != 1:
        return FormatCheck(False, f"expected exactly one <answer> block, found {n_answers}")
    if require_think and not any(n == "think" for _, n, *_ in tags):
        return FormatCheck(False, "no <think> block")
    open_tag, prev_block_end, prev_name, used, answer = None, 0, None, set(), ""
    for closing, name, start, end in tags:
        if require_results and open_tag is None and prev_name in TOOL_TAGS and (closing or name != "result"):
            return FormatCheck(False, f"<{prev_name}> call not followed by its <result>")
        if not closing:
            if open_tag is not None:
                return FormatCheck(False, f"<{name}> opened inside <{open_tag[0]}>")
            if name == "result" and (prev_name not in TOOL_TAGS or text[prev_block_end:start].strip()):
                return FormatCheck(False, "<result> not directly after a tool call")
            if prev_name == "answer":
                return FormatCheck(False, f"<{name}> after the answer")
            open_tag = (name, end)
        else:
            if open_tag is None or open_tag[0] != name:
                return FormatCheck(False, f"</{name}> without a matching <{name}> before it")
            if name in TOOL_TAGS:
                used.add(name)
            if name == "answer":
                answer = text[open_tag[1]:start]
            open_tag, prev_block_end, prev_name = None, end, name
    if require_boxed and "\\boxed{" not in answer:
        return FormatCheck(False, "no \\boxed{} in the answer", answer, frozenset(used))
    return FormatCheck(True, "", answer, frozenset(used))
