"""The tools' settings, declared once: the `tools` section of a run, read by the run builder (`arpo/build.py`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from arpo.settings import ConfigError, check_fields, check_names, opt


@dataclass
class McpServerConfig:
    """One stdio MCP server (`tools.mcp_servers` entry): started as `command args...`, its tools offered."""

    name: str = opt("", "what logs and errors call the server")
    command: str = opt("", "the executable that starts it (e.g. python, npx, uvx)")
    args: list[str] = opt([], "its command-line arguments")
    env: dict[str, str] = opt({}, "extra environment variables for it")


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
                                       "corpus of data.embedded_task")
    search_url: Optional[str] = opt(None, "search: HTTP retriever URL (used instead of the local corpus when set)")
    search_protocol: Literal["arpo", "retriever"] = opt(
        "arpo", "search: the service's protocol; arpo = POST {query, top_k}; retriever = Search-R1's retrieval "
        "server (url ends in /retrieve; POST {queries, topk, return_scores}, a step's queries in one request)")
    mcp_servers: list[McpServerConfig] = opt(
        [], "stdio MCP servers whose tools join the enabled ones ({name, command, args, env}); needs "
        "protocol=hermes")
    mcp_timeout_s: float = opt(30.0, "MCP: deadline per call (s); a server that does not answer is restarted", gt=0)
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
        names = [m.name for m in self.mcp_servers]
        for i, m in enumerate(self.mcp_servers):
            if not m.name or not m.command:
                raise ConfigError(f"{section}.mcp_servers[{i}]: needs a name and a command")
        if len(set(names)) != len(names):
            raise ConfigError(f"{section}.mcp_servers: two servers are named alike ({', '.join(names)})")
        if self.mcp_servers and self.protocol != "hermes":
            raise ConfigError(f"{section}.mcp_servers needs {section}.protocol=hermes (MCP tools are called by name "
                              "with JSON arguments)")
        if self.search_protocol != "arpo" and not self.search_url:
            raise ConfigError(f"{section}.search_protocol={self.search_protocol} needs {section}.search_url (the "
                              "server's /retrieve URL)")
        return self

    @property
    def call_timeout_s(self) -> float:
        """The executor's deadline per call: the sandbox's (and MCP's) own limit plus room to start and report."""
        return max(self.python_timeout_s, self.mcp_timeout_s if self.mcp_servers else 0.0) + 5.0


__all__ = ["McpServerConfig", "ToolsConfig"]
