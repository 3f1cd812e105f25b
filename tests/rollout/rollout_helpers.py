"""Fake tools and engine/executor builders shared by the rollout tests."""
import time

from arpo.engine import LLMEngine
from arpo.tools import BaseTool, ToolExecutor, ToolResult


class EchoTool(BaseTool):
    """Fast and deterministic: returns the length and the reversed content."""
    name, tag = "echo", "q"

    def run(self, text: str) -> ToolResult:
        return ToolResult(f"{len(text)} {text[::-1][:12]}", ok=True)


class JitteryEchoTool(EchoTool):
    """EchoTool's answers after a random delay (thread timing noise), logging when each call ran. With `steps`
    (the times engine steps finished, appended by the test), a call also waits, up to 5 s, for one engine step
    to finish while it runs: whether the engine steps during calls is then an outcome, not a race between the
    delay and a step's length on a loaded machine."""
    cacheable = False

    def __init__(self, steps: list | None = None):
        import random

        self.rng, self.spans, self.steps = random.Random(), [], steps

    def run(self, text: str) -> ToolResult:
        start = time.perf_counter()
        seen = len(self.steps) if self.steps is not None else 0
        time.sleep(self.rng.uniform(0.0, 0.03))
        deadline = time.monotonic() + 5.0
        while self.steps is not None and len(self.steps) == seen and time.monotonic() < deadline:
            time.sleep(0.001)
        self.spans.append((start, time.perf_counter()))
        return super().run(text)


class FailingTool(BaseTool):
    name, tag, cacheable = "failing", "q", False

    def run(self, text: str) -> ToolResult:
        raise RuntimeError("boom")


class HangingTool(BaseTool):
    name, tag, cacheable = "hanging", "q", False

    def run(self, text: str) -> ToolResult:
        time.sleep(4)
        return ToolResult("late", ok=True)


def make_engine(policy, **kw):
    model, tok = policy
    kw.setdefault("num_blocks", 1024)
    kw.setdefault("block_size", 8)
    kw.setdefault("max_model_len", 1024)
    return LLMEngine(model, tokenizer=tok, **kw)


def make_tools(tool=None, **kw):
    return ToolExecutor({"q": tool or EchoTool()}, max_workers=4, **kw)


PROMPTS = ["Q: 12*34+5=?", "Q: 7*8+9=?"]
