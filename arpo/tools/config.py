"""The tools' settings, declared once: the `tools` section of a run, read by the run builder (`arpo/build.py`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, check_names, opt


@dataclass
class ToolsConfig:
    """Tools the policy may call."""

    enabled: list[str] = opt(["python", "search"], "tool names (python, search) or 'pkg.module:ToolClass'")
    protocol: Literal["tags", "hermes"] = opt(
        "tags", "how calls look to the model: tags = ARPO's <python>…</python> with ' <result>…</result>' results; "
        "hermes = the chat template's native function calls (tool schemas in the prompt, <tool_call>{json}"
        "</tool_call>, results as tool turns; Qwen2.5-Instruct, Qwen3)")
    python_timeout_s: float = opt(10.0, "python sandbox: wall-clock limit per call (s)", gt=0)
    python_memory_mb: int = opt(1024, "python sandbox: address-space limit per call (MiB)", gt=0)
    search_corpus: Optional[str] = opt(None, "search: local JSONL corpus of {title, text}; null = the bundled "
                                       "embedded corpus")
    search_url: Optional[str] = opt(None, "search: HTTP retriever URL (used instead of the local corpus when set)")
    search_protocol: Literal["arpo", "retriever"] = opt(
        "arpo", "search: the service's protocol; arpo = POST {query, top_k}; retriever = Search-R1's retrieval "
        "server (url ends in /retrieve; POST {queries, topk, return_scores}, a step's queries in one request)")
    search_top_k: int = opt(3, "search: passages returned per query", gt=0)
    max_result_chars: int = opt(3000, "tool output longer than this is truncated (head and tail kept)", gt=0)
    workers: int = opt(8, "tool calls run concurrently in a pool of this many workers", gt=0)

    def __post_init__(self):
        self.check()

    def check(self, section: str = "tools") -> "ToolsConfig":
        from arpo.tools.registry import BUILTIN_TOOLS

        check_fields(self, section)
        check_names(f"{section}.enabled", self.enabled, BUILTIN_TOOLS)
        if len(set(self.enabled)) != len(self.enabled):
            raise ConfigError(f"{section}.enabled={self.enabled}: a tool is listed twice")
        if self.search_protocol != "arpo" and not self.search_url:
            raise ConfigError(f"{section}.search_protocol={self.search_protocol} needs {section}.search_url (the "
                              "server's /retrieve URL)")
        return self

    @property
    def call_timeout_s(self) -> float:
        """The executor's deadline per call: the sandbox's own limit plus room to start and report."""
        return self.python_timeout_s + 5.0


__all__ = ["ToolsConfig"]
