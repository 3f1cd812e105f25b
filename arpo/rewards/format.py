"""The strict format rules for a completed trajectory (`reward.strict_format`, and the `embedded` reward), with the
reason a trajectory fails them; the reference's own rules are `reference_format.py`.

The reference gives −1 for: unpaired tags, not exactly one `<answer>`, tags out of order, no `\\boxed{}`. Here
"in order" means the tags form a flat sequence of blocks (`<think>…</think>`, `<search>…</search>`,
`<python>…</python>`, `<result>…</result>`, `<answer>…</answer>`) with no nesting, every `<result>` directly
after a tool call, and the answer block last. Tag-like text inside code or a tool's output is content, not a
tag. The reason string is for logs and metrics.

Under `tools.protocol=hermes` (`protocol="hermes"`) the same rules hold for the native blocks: `<think>`,
`<tool_call>{json}</tool_call>`, `<tool_response>…</tool_response>`, `<answer>`; between a call and its response
only the chat template's role header may stand (the decoded `<|im_start|>user` of the tool turn), and the tools
used are the calls' JSON `name`s.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

TAGS = ("think", "search", "python", "result", "answer")
TOOL_TAGS = ("search", "python")
_VERBATIM = ("python", "result")


@dataclass(frozen=True)
class _Scheme:
    """The blocks of one tool protocol: all tags, the call tags, the result tag, the verbatim ones."""
    tags: tuple
    tool_tags: tuple
    result: str
    verbatim: tuple
    gap: re.Pattern  # what may stand between a call and its result

    @cached_property
    def pattern(self) -> re.Pattern:
        return re.compile(r"<(/?)(" + "|".join(self.tags) + r")>")


_SCHEMES = {
    "tags": _Scheme(TAGS, TOOL_TAGS, "result", _VERBATIM, re.compile(r"\s*")),
    "hermes": _Scheme(("think", "tool_call", "tool_response", "answer"), ("tool_call",), "tool_response",
                      ("tool_call", "tool_response"), re.compile(r"\s*(?:user|tool)?\s*")),
}


@dataclass(frozen=True)
class FormatCheck:
    ok: bool
    reason: str = ""
    answer: str = ""  # the text inside <answer>...</answer> when there is exactly one
    tools_used: frozenset = frozenset()


def _tags(text: str, scheme: _Scheme = _SCHEMES["tags"]) -> list[tuple[bool, str, int, int]]:
    """(closing, name, start, end) of each tag, ignoring tag-like text inside code and tool output."""
    tags, verbatim = [], None  # inside <python> or <result>, only the matching close tag counts
    for m in scheme.pattern.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if verbatim and not (closing and name == verbatim):
            continue
        verbatim = name if name in scheme.verbatim and not closing else None
        tags.append((closing, name, m.start(), m.end()))
    return tags


def _tool_name(scheme: _Scheme, name: str, body: str) -> str:
    """The tool a closed call block used: its tag, or under hermes the JSON call's `name` ("" if unreadable)."""
    if name != "tool_call":
        return name
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return ""
    return call.get("name", "") if isinstance(call, dict) and isinstance(call.get("name"), str) else ""


def check_format(text: str, require_boxed: bool = True, require_think: bool = False,
                 require_results: bool = False, protocol: str = "tags") -> FormatCheck:
    """The block grammar above under `protocol`'s tags; `require_think`: at least one think block;
    `require_results`: every tool call directly followed by its result (both the reference's rules, which strict
    `arpo` adds)."""
    if protocol not in _SCHEMES:
        raise ValueError(f"unknown tool protocol {protocol!r}: use one of {', '.join(_SCHEMES)}")
    scheme = _SCHEMES[protocol]
    tags = _tags(text, scheme)
    for name in scheme.tags:
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
        if (require_results and open_tag is None and prev_name in scheme.tool_tags
                and (closing or name != scheme.result)):
            return FormatCheck(False, f"<{prev_name}> call not followed by its <result>")
        if not closing:
            if open_tag is not None:
                return FormatCheck(False, f"<{name}> opened inside <{open_tag[0]}>")
            if name == scheme.result and (prev_name not in scheme.tool_tags
                                          or not scheme.gap.fullmatch(text[prev_block_end:start])):
                return FormatCheck(False, f"<{name}> not directly after a tool call")
            if prev_name == "answer":
                return FormatCheck(False, f"<{name}> after the answer")
            open_tag = (name, end)
        else:
            if open_tag is None or open_tag[0] != name:
                return FormatCheck(False, f"</{name}> without a matching <{name}> before it")
            if name in scheme.tool_tags:
                used.add(_tool_name(scheme, name, text[open_tag[1]:start].strip()) or name)
            if name == "answer":
                answer = text[open_tag[1]:start]
            open_tag, prev_block_end, prev_name = None, end, name
    if require_boxed and "\\boxed{" not in answer:
        return FormatCheck(False, "no \\boxed{} in the answer", answer, frozenset(used))
    return FormatCheck(True, "", answer, frozenset(used))
