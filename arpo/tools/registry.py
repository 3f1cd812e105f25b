"""Find tools by name: built-ins `python` and `search`, anything else by dotted path `pkg.module:ToolClass`.

Configs name tools as strings (`tools: [python, search]` or `my_pkg.tools:Calculator`) with keyword arguments;
`load_tool` turns one such spec into an instance and checks it speaks the protocol (name, tag, run).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from arpo.tools.base import Tool


def _python(**kwargs: Any) -> Tool:
    from arpo.tools.sandbox import PythonSandbox

    return PythonSandbox(**kwargs)


def _search(**kwargs: Any) -> Tool:
    """`url=...` selects the HTTP backend (`protocol=arpo|retriever`), `corpus_path=...` the local BM25 index (the
    run builder passes the bundled embedded corpus when the config names none)."""
    from arpo.tools.http_search import HttpSearch
    from arpo.tools.search import LocalSearch

    if "url" in kwargs:
        return HttpSearch(**kwargs)
    if "corpus_path" not in kwargs:
        raise ValueError("tool 'search' needs corpus_path=... (a JSONL corpus of {title, text}) or url=...")
    return LocalSearch(**kwargs)


BUILTIN_TOOLS: dict[str, Callable[..., Tool]] = {"python": _python, "search": _search}


def import_object(spec: str) -> Any:
    """`pkg.module:attr` (or `pkg.module.attr`) -> the object; errors name the spec and what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not a dotted path of the form 'pkg.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def check_tool(tool: Any, spec: str = "") -> Tool:
    missing = [a for a in ("name", "tag") if not isinstance(getattr(tool, a, None), str) or not getattr(tool, a)]
    if missing or not callable(getattr(tool, "run", None)):
        what = ", ".join(missing + ([] if callable(getattr(tool, "run", None)) else ["run()"]))
        raise TypeError(f"tool {spec or type(tool).__name__!r} lacks {what} (needs name, tag and run(text))")
    return tool


def load_tool(spec: str, **kwargs: Any) -> Tool:
    """A tool instance from a built-in name or a dotted path to a class / factory, called with `kwargs`."""
    if spec in BUILTIN_TOOLS:
        return check_tool(BUILTIN_TOOLS[spec](**kwargs), spec)
    if ":" not in spec and "." not in spec:
        raise ValueError(f"unknown tool {spec!r}: use one of {sorted(BUILTIN_TOOLS)} or 'pkg.module:ToolClass'")
    factory = import_object(spec)
    if not callable(factory):
        raise TypeError(f"{spec!r} is not a class or factory")
    return check_tool(factory(**kwargs), spec)


def load_tools(specs: dict[str, dict] | list[str]) -> dict[str, Tool]:
    """Several tools keyed by tag: `{"python": {"timeout_s": 5}, "my.mod:Calc": {}}` or `["python", "search"]`."""
    items = specs.items() if isinstance(specs, dict) else ((s, {}) for s in specs)
    tools: dict[str, Tool] = {}
    for spec, kwargs in items:
        tool = load_tool(spec, **(kwargs or {}))
        if tool.tag in tools:
            raise ValueError(f"two tools use the tag <{tool.tag}>: {spec!r} and {tools[tool.tag].name!r}")
        tools[tool.tag] = tool
    return tools
