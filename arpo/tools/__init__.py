"""Tools an ARPO policy calls mid-generation: the protocol, a sandboxed Python, search, and a concurrent runner.

    from arpo.tools import ToolExecutor, load_tools
    ex = ToolExecutor(load_tools(["python", "search"]))
"""
from arpo.tools.base import (BaseTool, Tool, ToolCall, ToolResult, format_result, parse_call, stop_strings,
                             strip_code_fence, truncate)
from arpo.tools.executor import LRUCache, ToolExecutor
from arpo.tools.registry import BUILTIN_TOOLS, import_object, load_tool, load_tools
from arpo.tools.sandbox import PythonSandbox
from arpo.tools.http_search import HttpSearch
from arpo.tools.search import LocalSearch

__all__ = ["BaseTool", "Tool", "ToolCall", "ToolResult", "format_result", "parse_call", "stop_strings",
           "strip_code_fence", "truncate", "LRUCache", "ToolExecutor", "BUILTIN_TOOLS", "import_object",
           "load_tool", "load_tools", "PythonSandbox", "HttpSearch", "LocalSearch"]
