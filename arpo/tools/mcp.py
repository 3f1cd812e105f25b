"""MCP tools (`tools.mcp_servers`): stdio servers of the Model Context Protocol, through the official `mcp` SDK.

    tools:
      protocol: hermes
      mcp_servers: [{name: calc, command: python, args: [calc_server.py]}]

Each server is started once (`stdio_client` + `ClientSession`, its `tools/list` read at start) and its tools join
the run's like built-in ones: `McpTool` carries the tool's JSON schema, so under `tools.protocol=hermes` the model
sees it in the prompt and calls it by name; the call's arguments reach `tools/call` as they are. The text parts of
the answer are the result; `isError` makes an error result.

The SDK is asyncio; the executor's worker threads are not. `McpServer` runs its own event loop on a daemon thread.
One long-lived task per connection enters the SDK's context managers and holds them (anyio requires one task to
enter and leave them); calls are separate tasks on the same session. A call gets `call_timeout_s`, the deadline
the run builder also gives the executor. A server that dies (the call fails) or hangs (the call times out) gives
that call an error result — never an exception — and is marked broken: the next call stops it and starts a fresh
process (counted in `restarts`), so a batch of calls never aborts and the rollout goes on.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

from arpo.tools.base import ToolResult


def _get(obj, *names, default=None):
    """The first of `names` that `obj` has (the SDK's 1.x camelCase vs 2.x snake_case fields)."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def result_text(result) -> str:
    """The text parts of a `CallToolResult` (other parts named by their type)."""
    parts = []
    for block in _get(result, "content", default=[]) or []:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    return "\n".join(parts)


@dataclass
class _Connection:
    """One server process: its session, the tools it listed, and the event that ends its owner task."""
    session: object
    tools: list
    stop: asyncio.Event
    task: asyncio.Task
    broken: bool = False


@dataclass
class McpToolSpec:
    name: str
    description: str = ""
    schema: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


class McpServer:
    """A stdio MCP server: started on construction, restarted after it died or hung, closed by `close()`."""

    def __init__(self, name: str, command: str, args=(), env: dict | None = None, call_timeout_s: float = 30.0,
                 start_timeout_s: float = 60.0):
        from mcp import StdioServerParameters

        self.name, self.call_timeout_s, self.start_timeout_s = name, float(call_timeout_s), float(start_timeout_s)
        self.params = StdioServerParameters(command=command, args=list(args), env=env)
        self.restarts = 0
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"arpo-mcp-{name}", daemon=True)
        self._thread.start()
        try:
            self.tools = [self._spec(t) for t in self._connection().tools]
        except BaseException:
            self.close()
            raise

    # --- connection ----------------------------------------------------------------------------------------
    async def _own(self, ready: asyncio.Future) -> None:
        """The connection's owner task: enter the SDK's contexts, list the tools, hold them until told to stop."""
        from mcp import ClientSession
        from mcp.client.stdio import stdio_client

        stop = asyncio.Event()
        try:
            async with stdio_client(self.params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    ready.set_result(_Connection(session, list(listed.tools), stop, asyncio.current_task()))
                    await stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the start
            if not ready.done():
                ready.set_exception(exc)

    async def _start(self) -> _Connection:
        ready = self._loop.create_future()
        task = self._loop.create_task(self._own(ready))
        try:
            return await asyncio.wait_for(asyncio.shield(ready), self.start_timeout_s)
        except BaseException:
            task.cancel()
            raise

    async def _stop(self, conn: _Connection) -> None:
        conn.stop.set()
        try:
            await asyncio.wait_for(conn.task, self.start_timeout_s)
        except BaseException:  # noqa: BLE001 - a server that will not stop is cancelled (its process killed)
            conn.task.cancel()

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _connection(self) -> _Connection:
        """The live connection, (re)started when there is none or the last one broke."""
        with self._lock:
            if self._conn is not None and not self._conn.broken:
                return self._conn
            if self._conn is not None:
                self._run(self._stop(self._conn), self.start_timeout_s + 5)
                self._conn = None
                self.restarts += 1
            try:
                self._conn = self._run(self._start(), self.start_timeout_s + 5)
            except Exception as exc:
                raise RuntimeError(f"MCP server {self.name!r} ({self.params.command} {' '.join(self.params.args)}) "
                                   f"did not start: {type(exc).__name__}: {exc}") from exc
            return self._conn

    # --- calls ---------------------------------------------------------------------------------------------
    def call(self, tool: str, arguments: dict) -> ToolResult:
        """`tools/call` of `tool`; every failure is an error result (a dead or hung server is restarted next)."""
        start = time.perf_counter()
        try:
            conn = self._connection()
        except RuntimeError as exc:
            return ToolResult.failure(f"Error: {exc}", time.perf_counter() - start)
        try:
            result = self._run(asyncio.wait_for(conn.session.call_tool(tool, arguments), self.call_timeout_s),
                               self.call_timeout_s + 5)
        except Exception as exc:  # noqa: BLE001
            conn.broken = True
            hung = isinstance(exc, (TimeoutError, asyncio.TimeoutError))
            why = (f"did not answer within {self.call_timeout_s:g} s" if hung
                   else f"failed ({type(exc).__name__}: {exc})")
            return ToolResult.failure(f"Error: MCP server {self.name!r} {why}; it is restarted for the next call",
                                      time.perf_counter() - start)
        text, latency = result_text(result), time.perf_counter() - start
        if _get(result, "is_error", "isError", default=False):
            return ToolResult.failure(f"Error: {text}" if text else f"Error: MCP tool {tool!r} failed", latency)
        return ToolResult(text, ok=True, latency_s=latency)

    @staticmethod
    def _spec(tool) -> McpToolSpec:
        schema = _get(tool, "input_schema", "inputSchema") or {"type": "object", "properties": {}}
        return McpToolSpec(tool.name, _get(tool, "description") or "", dict(schema))

    def close(self) -> None:
        """Stop the server process and the event loop; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if self._loop.is_running():
            if conn is not None:
                try:
                    self._run(self._stop(conn), self.start_timeout_s + 5)
                except Exception:  # noqa: BLE001 - closing must not raise
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()


class McpTool:
    """One tool of an MCP server, as the executor and the hermes protocol see it (`schema`: JSON arguments)."""

    cacheable = False  # MCP tools may act on the world; a repeat must run again
    batchable = False

    def __init__(self, server: McpServer, spec: McpToolSpec):
        self.server, self.name, self.tag = server, spec.name, spec.name
        self.description, self.schema = spec.description, spec.schema

    def run(self, text: str) -> ToolResult:
        try:
            arguments = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            return ToolResult.failure(f"Error: the arguments are not JSON ({exc.msg})")
        if not isinstance(arguments, dict):
            return ToolResult.failure("Error: the arguments must be a JSON object")
        return self.server.call(self.name, arguments)

    def close(self) -> None:
        self.server.close()


def load_mcp_tools(servers, call_timeout_s: float) -> dict[str, McpTool]:
    """The tools of every configured server (`{name, command, args, env}` entries), keyed by tag (= name)."""
    tools: dict[str, McpTool] = {}
    started: list[McpServer] = []
    try:
        for s in servers:
            server = McpServer(s.name, s.command, s.args, s.env or None, call_timeout_s=call_timeout_s)
            started.append(server)
            for spec in server.tools:
                if spec.name in tools:
                    raise ValueError(f"MCP servers {tools[spec.name].server.name!r} and {s.name!r} both offer a tool "
                                     f"named {spec.name!r}")
                tools[spec.name] = McpTool(server, spec)
    except BaseException:
        for server in started:
            server.close()
        raise
    return tools


__all__ = ["McpServer", "McpTool", "McpToolSpec", "load_mcp_tools", "result_text"]
