"""The tool protocol of ARPO rollouts: find a call in generated text, run it, format what comes back.

The policy writes `<python>code</python>` or `<search>query</search>`; generation stops at the closing tag, the
tool runs, and its output is appended as ` <result>\\n{text}\\n</result>` (loss mask 0). Everything here is plain
text: the rollout tokenises `format_result(...)` itself (token-in, token-out), so tools never see token ids.

A tool is anything with `name`, `tag` and a thread-safe `run(text) -> ToolResult`; `BaseTool` adds nothing but
defaults, so third-party tools need not inherit from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

RESULT_OPEN, RESULT_CLOSE = " <result>\n", "\n</result>"


@dataclass(frozen=True)
class ToolResult:
    """What a tool call produced. `text` is what the model sees (already truncated); `ok` is False on any failure
    (timeout, crash, limit, exception), in which case `error` holds a short reason for logs and `text` says it too."""

    text: str
    ok: bool
    latency_s: float = 0.0
    error: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    @staticmethod
    def failure(message: str, latency_s: float = 0.0, output: str = "") -> "ToolResult":
        text = f"{output.rstrip()}\n{message}" if output.strip() else message
        return ToolResult(text=text, ok=False, latency_s=latency_s, error=message)


@runtime_checkable
class Tool(Protocol):
    name: str
    tag: str

    def run(self, text: str) -> ToolResult: ...


class BaseTool:
    """Convenience base: `cacheable` results may be served from the executor's LRU cache; a `batchable` tool
    also has `run_batch(texts) -> list[ToolResult]` (one request for many calls), and the executor sends it the
    calls that are pending together."""

    name: str = ""
    tag: str = ""
    cacheable: bool = True
    batchable: bool = False
    # what the `hermes` protocol shows the model (arpo.tools.protocol): one string parameter named `argument`
    description: str = ""
    argument: str = "input"
    argument_description: str = "the tool's input"

    def run(self, text: str) -> ToolResult:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (indexes, connections); optional."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: which tool (by tag), its raw content, and where it sits in the generated text. A call the
    protocol could not make sense of (malformed JSON, an unknown tool) carries `error`: the result the model sees."""

    tag: str
    content: str
    start: int  # index of the opening tag in the text
    end: int  # index just past the closing tag
    error: str = ""


def stop_strings(tags: Iterable[str]) -> list[str]:
    """The strings at which generation must stop to run a tool: `</python>`, `</search>`, ..."""
    return [f"</{tag}>" for tag in tags]


def parse_call(text: str, tags: Iterable[str]) -> ToolCall | None:
    """The tool call that ends `text` (trailing whitespace allowed), or None.

    Only a call whose closing tag is the last thing generated counts: that is where generation stopped. The content
    is the text after the last matching opening tag; a closing tag without an opening one is not a call.
    """
    stripped = text.rstrip()
    for tag in tags:
        close = f"</{tag}>"
        if not stripped.endswith(close):
            continue
        end = len(stripped)
        body_end = end - len(close)
        start = stripped.rfind(f"<{tag}>", 0, body_end)
        if start < 0:
            return None
        return ToolCall(tag=tag, content=stripped[start + len(tag) + 2: body_end], start=start, end=end)
    return None


_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_+-]*[ \t]*\n?|\n?```\s*$")


def strip_code_fence(code: str) -> str:
    """Remove a markdown fence around code (```python ... ```), as models often write one inside <python>."""
    return _FENCE.sub("", code).strip("\n")


def truncate(text: str, max_chars: int | None, marker: str = "\n...[truncated {n} chars]...\n") -> str:
    """Keep head and tail of `text` within `max_chars` (None or <= 0: no limit), saying how much was cut."""
    if not max_chars or max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = len(text) - max_chars
    note = marker.format(n=cut)
    keep = max(max_chars - len(note), 0)
    head = keep * 2 // 3
    tail = keep - head
    return text[:head] + note + (text[len(text) - tail:] if tail else "")


def format_result(text: str) -> str:
    """The exact string appended after a tool call: ` <result>\\n{text}\\n</result>`."""
    return f"{RESULT_OPEN}{text}{RESULT_CLOSE}"
