"""`arpo chat`: one tool-using turn through a pseudo-terminal (pexpect), and the session's history, Ctrl-C and
context handling in process on the embedded checkpoint."""
from __future__ import annotations

import os
import signal
import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import serve_helpers as H  # noqa: E402

from arpo.engine import SamplingParams  # noqa: E402
from arpo.serve.chat import PROMPT, REPLY, ChatSession  # noqa: E402
from arpo.serve.settings import ChatSettings  # noqa: E402
from arpo.serve.text import chat_prompt_ids  # noqa: E402

QUESTION = "Q: 1*2+3=?"
AGENT_SEED = 8  # with this seed the toy policy's first call is `870+5522+124` (as in test_server.py)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_chat_in_a_terminal_runs_a_tool_and_shows_call_and_result(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    ckpt = H.make_checkpoint(str(tmp_path))
    argv = ["-m", "arpo", "chat", ckpt, *H.OVERRIDES, "--tools", "python", "--temperature", "1",
            "--seed", str(AGENT_SEED), "--max-tokens", "80"]
    env = dict(os.environ, PYTHONPATH=REPO, TERM="dumb")
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=180, dimensions=(50, 400))
    try:
        child.expect_exact(PROMPT)
        child.sendline(QUESTION)
        child.expect_exact(REPLY)
        child.expect_exact("[running python: 870+5522+124]")
        child.expect(r"\[tool result: ok, [0-9.]+ s\]")
        child.expect_exact("<result>")
        child.expect_exact("6516")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


# ---------------------------------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded checkpoint (a fresh one, as `arpo train` creates it), an engine on it here (the reference
    outputs), and an engine process on it with room for 4 sequences (the sessions' engine)."""
    from arpo.build import create_embedded_model
    from arpo.serve.engine_client import EngineClient
    from arpo.serve.server import load_parts

    cfg = H.config()
    path = create_embedded_model(cfg.model, str(tmp_path_factory.mktemp("chat") / "embedded"))
    engine, _ = load_parts(path, cfg, 4)
    served = EngineClient(path, cfg, 4)
    yield cfg, engine, served
    served.close()


class Script:
    """Inputs to `read` one by one, everything `write` shows collected; `on_write` runs on each write."""

    def __init__(self, lines, on_write=None):
        self.lines, self.shown, self.on_write = list(lines), [], on_write

    def read(self, prompt):
        self.shown.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def write(self, text):
        self.shown.append(text)
        if self.on_write:
            self.on_write(self, text)

    @property
    def text(self):
        return "".join(self.shown)


def _greedy(engine, ids, max_tokens):
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    return engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_multi_turn_history_reaches_the_model_and_reset_forgets_it(embedded):
    cfg, engine, served = embedded
    script = Script(["Q: 12+3=?", "Q: 4*5=?", "/reset", "/nope", "Q: 4*5=?", "/exit"])
    session = ChatSession(served, cfg.data, ChatSettings(temperature=0, max_tokens=12), script.read,
                          script.write)
    replies = []
    real_reply = session.reply
    session.reply = lambda text: replies.append((list(session.messages), real_reply(text))) or replies[-1][1]
    session.run()
    (h1, c1), (h2, c2), (h3, c3) = replies
    assert h1 == [] and h3 == []   # the third turn starts after /reset
    assert h2 == [{"role": "user", "content": "Q: 12+3=?"}, {"role": "assistant", "content": c1.text}]
    tok = engine.tokenizer
    second = chat_prompt_ids(tok, h2 + [{"role": "user", "content": "Q: 4*5=?"}], cfg.data)
    assert c2.text == _greedy(engine, second, 12)          # turn 2 saw turn 1's exchange
    alone = chat_prompt_ids(tok, [{"role": "user", "content": "Q: 4*5=?"}], cfg.data)
    assert c3.text == _greedy(engine, alone, 12)           # turn 3 did not
    assert "(history cleared)" in script.text and "unknown command '/nope'" in script.text
    assert session.engine.snapshot["free_blocks"] == session.engine.snapshot["num_blocks"]


def test_ctrl_c_stops_the_reply_frees_its_blocks_and_keeps_the_session(embedded):
    cfg, engine, served = embedded
    armed = {"on": True}

    def interrupt_on_first_token(script, text):
        if armed["on"] and script.shown[-2:-1] == [REPLY]:   # the first write after the reply marker
            armed["on"] = False
            signal.raise_signal(signal.SIGINT)                # what Ctrl-C in the terminal delivers

    script = Script(["Q: 12+3=?", "Q: 4*5=?"], interrupt_on_first_token)
    cancelled = served.snapshot["cancelled"]
    session = ChatSession(served, cfg.data, ChatSettings(temperature=1, max_tokens=60, seed=3), script.read,
                          script.write)
    session.run()
    assert "[interrupted]" in script.text
    assert script.text.count(PROMPT) == 3 and script.text.count(REPLY) == 2   # the session went on
    assert [m["role"] for m in session.messages][:1] == ["user"]
    H.wait_for(lambda: session.engine.snapshot["free_blocks"] == session.engine.snapshot["num_blocks"],
               what="the interrupted reply's blocks to be freed")
    assert session.engine.snapshot["cancelled"] == cancelled + 1


def test_a_history_longer_than_the_context_is_refused_with_the_counts(embedded):
    cfg, engine, served = embedded
    script = Script(["x" * (engine.max_model_len + 5)])
    session = ChatSession(served, cfg.data, ChatSettings(temperature=0, max_tokens=4), script.read,
                          script.write)
    session.run()
    assert f"the context is {engine.max_model_len}" in script.text and "/reset" in script.text
    assert session.messages == []
