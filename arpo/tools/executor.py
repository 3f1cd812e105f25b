"""Run many tool calls at once for the rollout, never raising.

A tree rollout reaches dozens of tool calls per step, often identical (16 leaves of one prompt run the same
`print(123*45+6)`). `ToolExecutor` runs them on a thread pool (the tools themselves are thread-safe; the sandbox
spends its time in a child process, search in numpy), serves repeats from an LRU cache, enforces a per-call
deadline on top of the tool's own limits, truncates, and turns every failure into an error ToolResult. The calls
submitted together (`submit_many`: a rollout step's) of a `batchable` tool go to it in one `run_batch` — one
request to a retrieval server instead of one per query. Only those: calls that arrive while a request is in flight
get their own, so which calls share a request (and a failed request's error) depends on the rollout alone, never
on timing, and a `sync_tools` rollout stays a function of its seed.

    ex = ToolExecutor(load_tools(["python", "search"]), max_workers=8)
    call = ex.parse(generated_text)            # None when the text does not end in a tool call
    results = ex.run_many([call, ...])          # same order; each has .text, .ok, .latency_s
    futures = ex.submit_many([call, ...])       # the rollout's way: one future per call
    appended = ex.format(results[0])            # " <result>\\n...\\n</result>"

How calls and results look to the model is `ex.protocol`'s business (`arpo.tools.protocol`: `tags`, the default,
or `hermes`); the executor's `stop_strings`, `parse` and `format` ask it. A call the protocol marked with an
`error` (malformed, unknown tool) is answered with that error, without running anything.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterable

from arpo.tools.base import Tool, ToolCall, ToolResult, truncate
from arpo.tools.protocol import TagsProtocol


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
                 timeout_s: float | None = None, max_result_chars: int | None = 4000, cache_size: int = 1024,
                 protocol=None):
        self.tools = dict(tools) if isinstance(tools, dict) else {t.tag: t for t in tools}
        if not self.tools:
            raise ValueError("ToolExecutor needs at least one tool")
        self.protocol = protocol if protocol is not None else TagsProtocol(self.tools)
        self.timeout_s, self.max_result_chars = timeout_s, max_result_chars
        self.cache = LRUCache(cache_size)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="arpo-tool")

    @property
    def stop_strings(self) -> list[str]:
        return list(self.protocol.stop_strings)

    def parse(self, text: str) -> ToolCall | None:
        return self.protocol.parse(text)

    def format(self, result: ToolResult) -> str:
        return self.protocol.result_text(result)

    def run(self, call: ToolCall) -> ToolResult:
        """Run one call in the calling thread (cached, truncated, never raising)."""
        return self.run_batch([call])[0]

    def run_batch(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run calls in the calling thread, results in order: repeats from the cache, a batchable tool's calls in
        one `run_batch`, the others one `run` each (truncated, never raising)."""
        results: list[ToolResult | None] = [None] * len(calls)
        todo: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            if call.error:
                results[i] = ToolResult.failure(call.error)
                continue
            tool = self.tools.get(call.tag)
            if tool is None:
                results[i] = ToolResult.failure(f"Error: unknown tool <{call.tag}>")
                continue
            hit = self.cache.get((call.tag, call.content)) if getattr(tool, "cacheable", True) else None
            if hit is not None:
                results[i] = ToolResult(hit.text, hit.ok, 0.0, hit.error, dict(hit.meta, cached=True))
            else:
                todo.setdefault(call.tag, []).append(i)
        for tag, idx in todo.items():
            tool = self.tools[tag]
            for i, result in zip(idx, self._invoke(tool, tag, [calls[i].content for i in idx])):
                results[i] = self._keep(tool, calls[i], result)
        return results

    def _invoke(self, tool: Tool, tag: str, texts: list[str]) -> list[ToolResult]:
        """The tool's results for `texts`: one `run_batch` if it batches, else one `run` each."""
        if getattr(tool, "batchable", False):
            return _guarded(tag, len(texts), lambda: tool.run_batch(texts))
        return [r for t in texts for r in _guarded(tag, 1, lambda t=t: [tool.run(t)])]

    def _keep(self, tool: Tool, call: ToolCall, result: ToolResult) -> ToolResult:
        """Truncate a fresh result and cache it if it succeeded."""
        if self.max_result_chars and len(result.text) > self.max_result_chars:
            result = ToolResult(truncate(result.text, self.max_result_chars), result.ok, result.latency_s,
                                result.error, result.meta)
        if getattr(tool, "cacheable", True) and result.ok:
            self.cache.put((call.tag, call.content), result)
        return result

    def submit(self, call: ToolCall) -> Future:
        """Start a call on the pool; the future's result is a ToolResult (deadline applied in `result_of`)."""
        return self._pool.submit(self.run, call)

    def submit_many(self, calls: list[ToolCall]) -> list[Future]:
        """Start calls on the pool, one future each. A batchable tool's calls share one task — one request to a
        retrieval server for all the queries a rollout step made; the other calls run concurrently, one a task."""
        futures: list[Future | None] = [None] * len(calls)
        shared: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            if not call.error and getattr(self.tools.get(call.tag), "batchable", False):
                shared.setdefault(call.tag, []).append(i)
            else:
                futures[i] = self.submit(call)
        for idx in shared.values():
            group = [Future() for _ in idx]
            task = self._pool.submit(self._run_shared, [calls[i] for i in idx], group)
            task.add_done_callback(lambda t, g=group: [f.cancel() for f in g] if t.cancelled() else None)
            for i, f in zip(idx, group):
                futures[i] = f
        return futures

    def _run_shared(self, calls: list[ToolCall], futures: list[Future]) -> None:
        """Resolve the futures of calls that were not cancelled meanwhile with one `run_batch` over them."""
        live = [(c, f) for c, f in zip(calls, futures) if f.set_running_or_notify_cancel()]
        try:
            results = self.run_batch([c for c, _ in live]) if live else []
        except BaseException as exc:  # noqa: BLE001 - never leave a future unresolved
            results = [ToolResult.failure(f"Error: tool call failed: {type(exc).__name__}: {exc}")] * len(live)
        for (_, f), result in zip(live, results):
            f.set_result(result)

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
        """Run calls concurrently (a batchable tool's together); results come back in order. A None call yields
        an error result."""
        started = time.perf_counter()
        submitted = iter(self.submit_many([c for c in calls if c is not None]))
        futures = [next(submitted) if c is not None else None for c in calls]
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


def _guarded(tag: str, n: int, call) -> list[ToolResult]:
    """`call()`'s n ToolResults; an exception or a wrong return becomes n error results (a tool bug must not end
    the rollout)."""
    start = time.perf_counter()
    try:
        got = list(call())
        bad = [r for r in got if not isinstance(r, ToolResult)]
        if bad or len(got) != n:
            what = type(bad[0]).__name__ if bad else f"{len(got)} results for {n} calls"
            raise TypeError(f"run() returned {what}, not ToolResult")
        return got
    except Exception as exc:  # noqa: BLE001
        return [ToolResult.failure(f"Error: tool {tag} failed: {type(exc).__name__}: {exc}",
                                   time.perf_counter() - start)] * n
