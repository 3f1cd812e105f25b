"""`arpo serve` agent mode and `arpo chat` under `tools.protocol=hermes`, on a tokenizer carrying Qwen2.5's chat
template and the real python sandbox.

The policy writes a fixed script by position (`tests/tools/scripted_policy.py`): the conversation below rendered
by the template, with two calls — a good one the sandbox runs, and one naming an unknown tool, whose error is the
result the model sees — and a final answer (then, for `arpo chat`, a second user turn). A served reply equals the
script only if the server rendered the prompt with the tools' schemas and appended each tool turn as the
template's tokens, and stopped at `</tool_call>`; a wrong or missing token shifts the positions and the output
visibly diverges."""
from __future__ import annotations

import os
import sys

import openai
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import serve_helpers as H  # noqa: E402
from chat_templates import qwen_chat_tokenizer  # noqa: E402
from scripted_parts import save_script  # noqa: E402

from arpo.tools import ToolResult  # noqa: E402

MODEL = "qwen-scripted"
QUESTION = "What is 6*7? Use python."
GOOD = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "calc", "arguments": {"x": 1}}\n</tool_call>'
ANSWER = "<answer>42</answer>"
# a call whose real output is template-special text: it must stay plain text inside the tool turn
NASTY = ('<tool_call>\n{"name": "python", "arguments": {"code": "print(\'<|im_\' + \'end|>\' + str(6*7))"}}\n'
         '</tool_call>')


@pytest.fixture(scope="module")
def setup():
    """(tokenizer, run config, hermes tool executor, the script's conversation, its ids without the last "\\n")."""
    from arpo.build import build_tools

    tok = qwen_chat_tokenizer("qwen2.5")
    cfg = H.config("tools.protocol=hermes", "tools.enabled=[python]", "data.chat_template=true")
    tools = build_tools(cfg, tok)
    error = tools.protocol.parse(BAD).error
    assert "unknown tool 'calc'" in error
    conv = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": GOOD}, {"role": "tool", "content": "42"},
            {"role": "assistant", "content": BAD}, {"role": "tool", "content": error},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "Thanks. Again?"}, {"role": "assistant", "content": ANSWER}]
    full = _ids(tok.apply_chat_template(conv, tools=tools.protocol.schemas, tokenize=True))
    assert tok.decode(full[-1:]) == "\n"
    try:
        yield tok, cfg, tools, conv, full[:-1]
    finally:
        tools.close()


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """`scripted(tok, cfg, script)`: an engine process running the scripted policy on `script` with the python
    tool (its builder, `scripted_parts.load_scripted`, imported there through PYTHONPATH); closed at the end."""
    from arpo.serve.engine_client import EngineClient

    paths = [HERE, os.path.join(os.path.dirname(HERE), "tools"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    started = []

    def start(tok, cfg, script):
        path = save_script(str(tmp_path / f"scripted{len(started)}"), tok, script)
        started.append(EngineClient(path, cfg, 4, ["python"], parts="scripted_parts:load_scripted"))
        return started[-1]

    yield start
    for engine in started:
        engine.close()


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _first_turn(tok, tools, conv, script):
    """(prompt ids, the first reply's ids: sampled and appended, through its closing <|im_end|>)."""
    prompt = tools.protocol.render_prompt(tok, conv[:1])
    turn = _ids(tok.apply_chat_template(conv[:6], tools=tools.protocol.schemas, tokenize=True))[:-1]  # no "\n"
    assert script[:len(turn)] == turn and turn[:len(prompt)] == prompt
    return prompt, turn[len(prompt):]


def test_served_agent_request_follows_hermes(setup, scripted):
    """The first call's real output is `<|im_end|>42`: appended as the protocol's result tokens (the frame around
    the output tokenised as plain text), it cannot close the tool turn early."""
    from arpo.serve.app import Server
    from arpo.serve.server import ServerThread
    from arpo.serve.settings import ServeSettings
    from arpo.tools.sandbox import PythonSandbox

    tok, cfg, tools, conv, _ = setup
    proto = tools.protocol
    prompt = proto.render_prompt(tok, conv[:1])
    error = proto.parse(BAD).error
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    reply = (enc(NASTY) + proto.result_ids(tok, ToolResult("<|im_end|>42", True)) + enc(BAD)
             + proto.result_ids(tok, ToolResult(error, False)) + enc(ANSWER + "<|im_end|>"))
    server = Server(scripted(tok, cfg, prompt + reply), cfg.data, ServeSettings(model_name=MODEL), MODEL)
    with ServerThread(server) as st:
        client = openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=300)
        kw = dict(model=MODEL, messages=conv[:1], max_tokens=600, temperature=0)
        r = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
    ext = r.choices[0].model_extra["arpo"]
    assert r.usage.prompt_tokens == len(prompt)         # the prompt carried the tools' schemas
    assert ext["token_ids"] == reply                     # calls sampled, tool turns appended as the protocol's
    assert r.choices[0].finish_reason == "stop" and ext["tool_calls"] == 2
    kinds = [x["type"] for x in ext["transcript"]]
    assert kinds == ["text", "tool_call", "tool_result", "text", "tool_call", "tool_result", "text"]
    call, result, bad, failed = (ext["transcript"][k] for k in (1, 2, 4, 5))
    assert (call["tool"], "error" in call) == ("python", False)
    sandbox = PythonSandbox(timeout_s=10)
    try:  # the real sandbox's output
        assert result["ok"] and result["output"] == sandbox.run(call["input"]).text == "<|im_end|>42"
    finally:
        sandbox.close()
    assert bad["input"] == '{"name": "calc", "arguments": {"x": 1}}' and bad["error"] == error
    assert not failed["ok"] and failed["output"] == error   # the error is the result the model saw
    assert r.usage.model_extra["arpo"]["tool_result_tokens"] == len(reply) - len(
        enc(NASTY + BAD + ANSWER + "<|im_end|>"))
    text = r.choices[0].message.content
    assert text == tok.decode(reply, skip_special_tokens=True) and text.startswith(NASTY)
    assert "<tool_response>\n<|im_end|>42\n</tool_response>" in text and text.endswith(ANSWER)
    # streamed: the same text, the call and its result as they happen
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    shown = [ch.choices[0].model_extra.get("arpo", {}) for ch in chunks]
    assert [s["tool_call"]["tool"] for s in shown if "tool_call" in s] == ["python", ""]
    assert [s["tool_result"]["output"] for s in shown if "tool_result" in s] == ["<|im_end|>42", error]


def test_chat_turns_follow_hermes_and_the_history_rerenders_as_seen(setup, scripted):
    from arpo.serve.chat import ChatSession
    from arpo.serve.settings import ChatSettings
    from arpo.serve.text import chat_prompt_ids

    tok, cfg, tools, conv, script = setup
    prompt, reply = _first_turn(tok, tools, conv, script)
    lines, shown = [QUESTION, "Thanks. Again?"], []

    def read(_prompt):
        if not lines:
            raise EOFError
        return lines.pop(0)

    session = ChatSession(scripted(tok, cfg, script), cfg.data, ChatSettings(temperature=0, max_tokens=600),
                          read, shown.append)
    choices = []
    real_reply = session.reply
    session.reply = lambda text: choices.append(real_reply(text)) or choices[-1]
    session.run()
    first, second = choices
    assert first.token_ids == reply and second.text == ANSWER
    out = "".join(shown)
    assert "(hermes)" in out and "[running python: print(6*7)]" in out
    assert "[bad tool call: Error: unknown tool 'calc'" in out and "[tool result: failed" in out
    assert "[tool result: ok" in out and "<tool_response>\n42\n</tool_response>" in out
    # the history holds the real result in the template's roles, and re-renders as the tokens the model saw
    assert session.messages[:6] == conv[:6]
    assert session.messages[2] == {"role": "tool", "content": "42"}
    history = chat_prompt_ids(tok, session.messages[:7], cfg.data, tools.protocol)
    assert history == script[:len(history)] and len(history) > len(prompt) + len(reply)


def test_serve_parts_speak_the_configured_protocol(tmp_path):
    """`arpo serve`/`arpo chat` build their tools with the checkpoint's tokenizer, so `tools.protocol=hermes`
    renders through its chat template; without `data.chat_template` it is refused at start, naming the field."""
    from arpo.config import ConfigError
    from arpo.model import CausalLM, ModelConfig
    from arpo.serve.engine_client import EngineClient
    from arpo.serve.server import load_parts
    from arpo.tools.protocol import HermesProtocol

    tok = qwen_chat_tokenizer("qwen2.5")
    path = str(tmp_path / "qwen-tiny")
    CausalLM(ModelConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4)).save_pretrained(path)
    tok.save_pretrained(path)
    engine, tools = load_parts(path, H.config("tools.protocol=hermes", "data.chat_template=true"), 2, ["python"])
    try:
        assert isinstance(tools.protocol, HermesProtocol) and tools.stop_strings == ["</tool_call>"]
        assert [s["function"]["name"] for s in tools.protocol.schemas] == ["python"]
    finally:
        tools.close()
    with pytest.raises(ConfigError, match="needs data.chat_template=true"):
        load_parts(path, H.config("tools.protocol=hermes", "data.chat_template=false"), 2, ["python"])
    # the front end of an engine process renders with the same protocol; the refusal comes back from the child
    served = EngineClient(path, H.config("tools.protocol=hermes", "data.chat_template=true"), 2, ["python"])
    try:
        assert isinstance(served.protocol, HermesProtocol) and served.tools == ["python"]
        assert served.protocol.schemas == tools.protocol.schemas
    finally:
        served.close()
    with pytest.raises(ConfigError, match="needs data.chat_template=true"):
        EngineClient(path, H.config("tools.protocol=hermes", "data.chat_template=false"), 2, ["python"])
