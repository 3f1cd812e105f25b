"""Call parsing, result formatting, truncation, the registry and the concurrent executor."""
import threading
import time

import pytest

from arpo.tools import (BaseTool, ToolExecutor, ToolResult, format_result, load_tool, load_tools, parse_call,
                        stop_strings, strip_code_fence, truncate)
from arpo.tools.base import ToolCall


class EchoTool(BaseTool):
    name = tag = "echo"

    def __init__(self, prefix: str = "", delay_s: float = 0.0):
        self.prefix, self.delay_s, self.calls = prefix, delay_s, 0
        self._lock = threading.Lock()

    def run(self, text):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return ToolResult(self.prefix + text, True, self.delay_s)


class BrokenTool(BaseTool):
    name = tag = "broken"

    def run(self, text):
        raise RuntimeError("boom")


def test_parse_call_takes_the_call_that_ends_the_text():
    text = "<think>hm</think><python>print(1)</python> <result>\n1\n</result><python>print(2)</python>\n"
    call = parse_call(text, ["search", "python"])
    assert call.tag == "python" and call.content == "print(2)"
    assert text[call.start:call.end] == "<python>print(2)</python>"
    assert parse_call("<python>x</python> and more", ["python"]) is None
    assert parse_call("no open</python>", ["python"]) is None
    assert parse_call("<search>a b</search>", ["python", "search"]).content == "a b"


def test_format_and_stop_strings():
    assert format_result("42") == " <result>\n42\n</result>"
    assert stop_strings(["python", "search"]) == ["</python>", "</search>"]
    assert strip_code_fence("```py\nx = 1\n```") == "x = 1"


@pytest.mark.parametrize("n", [40, 50, 200])
def test_truncate_keeps_head_and_tail(n):
    text = "".join(chr(97 + i % 26) for i in range(500))
    out = truncate(text, n)
    note = f"\n...[truncated {500 - n} chars]...\n"
    head, tail = out.split(note)
    assert len(out) == n and text.startswith(head) and text.endswith(tail) and len(head) >= len(tail)
    assert truncate(text, None) == text and truncate("short", 100) == "short"


def test_registry_builtins_and_dotted_path(tmp_path):
    tool = load_tool(f"{__name__}:EchoTool", prefix=">")
    assert isinstance(tool, EchoTool) and tool.run("x").text == ">x"
    py = load_tool("python", timeout_s=3)
    assert py.tag == "python" and py.timeout_s == 3
    from arpo.data.world import CORPUS_PATH

    tools = load_tools({"python": {}, "search": {"corpus_path": CORPUS_PATH}})
    assert set(tools) == {"python", "search"}
    with pytest.raises(ValueError, match="unknown tool"):
        load_tool("calculator")
    with pytest.raises(ValueError, match="cannot import module"):
        load_tool("no_such_pkg.mod:Tool")
    with pytest.raises(ValueError, match="no attribute"):
        load_tool(f"{__name__}:Missing")
    with pytest.raises(TypeError, match="lacks"):
        load_tool(f"{__name__}:ToolResult", text="x", ok=True)
    with pytest.raises(ValueError, match="two tools"):
        load_tools([f"{__name__}:EchoTool", f"{__name__}.EchoTool"])


def test_executor_runs_concurrently_in_order_with_cache():
    echo = EchoTool(delay_s=0.2)
    with ToolExecutor([echo], max_workers=8) as ex:
        calls = [ToolCall("echo", f"q{i % 4}", 0, 0) for i in range(8)]
        start = time.perf_counter()
        results = ex.run_many(calls)
        assert time.perf_counter() - start < 0.2 * 8 / 2  # concurrent, not sequential
        assert [r.text for r in results] == [f"q{i % 4}" for i in range(8)]
        again = ex.run(ToolCall("echo", "q1", 0, 0))
        assert again.meta.get("cached") and again.text == "q1" and ex.cache.hits >= 1
        assert ex.stop_strings == ["</echo>"]
        assert ex.format(again) == " <result>\nq1\n</result>"


def test_executor_never_raises():
    with ToolExecutor([BrokenTool(), EchoTool(delay_s=1.0)], timeout_s=0.2, cache_size=0) as ex:
        broken, slow, unknown, missing = ex.run_many(
            [ToolCall("broken", "x", 0, 0), ToolCall("echo", "y", 0, 0), ToolCall("nope", "z", 0, 0), None])
    assert not broken.ok and "boom" in broken.text
    assert not slow.ok and "deadline" in slow.text
    assert not unknown.ok and "unknown tool" in unknown.text
    assert not missing.ok


def test_executor_truncates_and_skips_cache_on_failure():
    echo = EchoTool()
    with ToolExecutor([echo], max_result_chars=40) as ex:
        res = ex.run(ToolCall("echo", "z" * 100, 0, 0))
        assert len(res.text) <= 40 and "truncated" in res.text
    bad = ToolExecutor([BrokenTool()])
    bad.run(ToolCall("broken", "x", 0, 0))
    assert len(bad.cache) == 0
    bad.close()


def test_executor_with_real_sandbox():
    with ToolExecutor(load_tools({"python": {"timeout_s": 3, "memory_mb": 256}})) as ex:
        text = "<python>print(123*45+6)</python>"
        res = ex.run_many([ex.parse(text)] * 3 + [ex.parse("<python>while True: pass</python>")])
    assert [r.text for r in res[:3]] == [str(123 * 45 + 6)] * 3 and not res[3].ok
