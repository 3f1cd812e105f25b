"""Run many tool calls at once for the rollout, never raising.

A tree rollout reaches dozens of tool calls per step, often identical (16 leaves of one prompt run the same
`print(123*45+6)`). `ToolExecutor` runs them on a thread pool (the tools themselves are thread-safe; the sandbox
spends its time in a child process, search in numpy), serves repeats from an LRU cache, enforces a per-call
deadline on top of the tool's own limits, truncates, and turns every failure into an error ToolResult.

    ex = ToolExecutor(load_tools(["python", "search"]), max_workers=8)
    call = ex.parse(generated_text)            # None when the text does not end in a tool call
    results = ex.run_many([call, ...])          # same order; each has .text, .ok, .latency_s
    appended = ex.format(results[0])            # " <result>\\n...\\n</result>"
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterable

from arpo.tools.base import Tool, ToolCall, ToolResult, format_result, parse_call, stop_strings, truncate


class LRUCache:
    """A small thread-safe LRU map; `maxsize` 0 disables it."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class ToolExecutor:
    """Thread-pool runner over tools keyed by tag (a dict, or an iterable of tools)."""

    def __init__(self, tools: dict[str, Tool] | Iterable[Tool], max_workers: int = 8,
                 timeout_s: float | None = None, max_result_chars: int | None = 4000, cache_size: int = 1024):
        self.tools = dict(tools) if isinstance(tools, dict) else {t.tag: t for t in tools}
        if not self.tools:
            raise ValueError("ToolExecutor needs at least one tool")
        self.timeout_s, self.max_result_chars = timeout_s, max_result_chars
        self.cache = LRUCache(cache_size)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="arpo-tool")

    @property
    def stop_strings(self) -> list[str]:
        return stop_strings(self.tools)

    def parse(self, text: str) -> ToolCall | None:
        return parse_call(text, self.tools)

    @staticmethod
    def format(result: ToolResult) -> str:
        return format_result(result.text)

    def run(self, call: ToolCall) -> ToolResult:
        """Run one call in the calling thread (cached, truncated, never raising)."""
        tool = self.tools.get(call.tag)
        if tool is None:
            return ToolResult.failure(f"Error: unknown tool <{call.tag}>")
        key = (call.tag, call.content)
        cacheable = getattr(tool, "cacheable", True)
        if cacheable:
            hit = self.cache.get(key)
            if hit is not None:
                return ToolResult(hit.text, hit.ok, 0.0, hit.error, dict(hit.meta, cached=True))
        start = time.perf_counter()
        try:
            result = tool.run(call.content)
            if not isinstance(result, ToolResult):
                raise TypeError(f"run() returned {type(result).__name__}, not ToolResult")
        except Exception as exc:  # noqa: BLE001 - a tool bug must not end the rollout
            result = ToolResult.failure(f"Error: tool {call.tag} failed: {type(exc).__name__}: {exc}",
                                        time.perf_counter() - start)
        if self.max_result_chars and len(result.text) > self.max_result_chars:
            result = ToolResult(truncate(result.text, self.max_result_chars), result.ok, result.latency_s,
                                result.error, result.meta)
        if cacheable and result.ok:
            self.cache.put(key, result)
        return result

    def submit(self, call: ToolCall) -> Future:
        """Start a call on the pool; the future's result is a ToolResult (deadline applied in `result_of`)."""
        return self._pool.submit(self.run, call)

    def result_of(self, future: Future, started: float | None = None) -> ToolResult:
        """Wait for a submitted call, turning an overrun of `timeout_s` or any error into an error result."""
        left = self.timeout_s
        if left is not None and started is not None:
            left = max(0.0, left - (time.perf_counter() - started))
        try:
            return future.result(timeout=left)
        except FutureTimeout:
            future.cancel()
            return ToolResult.failure(f"Error: tool call exceeded the {self.timeout_s:g} s deadline",
                                      self.timeout_s or 0.0)
        except Exception as exc:  # noqa: BLE001
            return ToolResult.failure(f"Error: tool call failed: {type(exc).__name__}: {exc}")

    def run_many(self, calls: list[ToolCall | None]) -> list[ToolResult]:
        """Run calls concurrently; results come back in order. A None call yields an error result."""
        started = time.perf_counter()
        futures = [self.submit(c) if c is not None else None for c in calls]
        return [self.result_of(f, started) if f is not None else ToolResult.failure("Error: no tool call found")
                for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for tool in self.tools.values():
            close = getattr(tool, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "ToolExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
