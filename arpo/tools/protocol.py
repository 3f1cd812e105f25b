"""How tool calls look to the model (`tools.protocol`): ARPO's tags, or the chat template's native function calls.

The rollout, SFT, evaluation and `arpo serve`/`arpo chat` ask one small object the same few things — where
generation stops, what call the text ends in, which tokens carry a result, how a prompt is rendered, how a finished
reply goes back into a conversation's messages — so that the two formats are two classes:

* `TagsProtocol` (`tags`, ARPO's): `<python>code</python>` / `<search>query</search>`, results appended as
  ` <result>\\n{text}\\n</result>`; prompts through the chat template as they are.
* `HermesProtocol` (`hermes`): the function calling Qwen2.5-Instruct and Qwen3 learned. The tools' JSON schemas go
  into the prompt through the tokenizer's chat template (`apply_chat_template(..., tools=schemas)`); the model
  writes `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>` and generation stops at `</tool_call>`;
  the result is appended as the template's own rendering of a tool turn — for Qwen
  `<|im_end|>\\n<|im_start|>user\\n<tool_response>\\n{text}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n` —
  and generation resumes in that new assistant turn. Malformed JSON, a call that is not `{name, arguments}`, an
  unknown tool or a wrong argument become a call whose `error` the executor returns as the result the model
  sees; nothing raises.

Token-in, token-out: the frame around a result (the text before and after it in the rendered tool turn) is found
once from the template, with a marker as the result, and tokenised once; a result's tokens are
`frame_head + literal(text) + frame_tail`, where `literal` tokenises special-token text (`<|im_end|>` inside a
tool's output) as plain text, so a result can never close the turn early. Earlier tokens are never re-tokenised.
Known differences from tokenising the whole rendered conversation at once: (1) that special-token text, which
the template alone would turn into real special tokens; (2) a result whose first or last characters would merge
with the frame's newline into one BPE token (e.g. a result starting with a blank line) is tokenised at the frame
boundary — the same text, a different split.

A tool offers itself to `hermes` with `name`, `description` and either `schema` (a JSON-schema `parameters`
object; its `run` gets the arguments as a JSON object text — MCP tools) or `argument` (the name of its one
string parameter, default `input`; its `run` gets that string — the built-in python and search tools).
"""
from __future__ import annotations

import json
import re

from arpo.tools.base import ToolCall, ToolResult, format_result, parse_call, stop_strings

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_MARK = "\x00arpo-tool-result\x00"


def template_ids(out) -> list[int]:
    """`apply_chat_template(tokenize=True)`'s ids (transformers 5 may return a BatchEncoding)."""
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def literal_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with special-token text in it tokenised as plain text."""
    try:
        return [int(t) for t in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    except TypeError:  # a tokenizer without split_special_tokens
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


class TagsProtocol:
    """ARPO's `<tag>…</tag>` calls and ` <result>…</result>` results (see `arpo.tools.base`)."""

    name = "tags"
    needs_chat_template = False
    result_span = re.compile(r"( <result>\n.*?\n</result>)", re.S)  # a result inside a trace's text

    def __init__(self, tools: dict):
        self.tools = tools
        self.stop_strings = tuple(stop_strings(tools))

    def parse(self, text: str) -> ToolCall | None:
        return parse_call(text, self.tools)

    def result_text(self, result: ToolResult) -> str:
        return format_result(result.text)

    def result_ids(self, tokenizer, result: ToolResult) -> list[int]:
        return list(tokenizer.encode(self.result_text(result), add_special_tokens=False))

    def render_prompt(self, tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
        return template_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          **template_kwargs))

    def reply_messages(self, parts: list[tuple[str, str]]) -> list[dict]:
        """A reply as conversation history: one assistant message holding the text as the model continued from
        it, results included. `parts`: ("text", model text) and ("result", tool output) in order."""
        return [{"role": "assistant", "content": "".join(
            text if kind == "text" else format_result(text) for kind, text in parts)}]


def function_schema(tool) -> dict:
    """The OpenAI/Hermes function schema the chat template shows for `tool`."""
    params = getattr(tool, "schema", None)
    if params is None:
        arg = getattr(tool, "argument", "input")
        params = {"type": "object", "properties": {arg: {"type": "string", "description": getattr(
            tool, "argument_description", arg)}}, "required": [arg]}
    return {"type": "function", "function": {"name": tool.name, "description": getattr(tool, "description", ""),
                                             "parameters": params}}


def tool_input(tool, arguments: dict) -> str:
    """The text `tool.run` gets for a call's `arguments` (ValueError naming what is wrong)."""
    if getattr(tool, "schema", None) is not None:
        return json.dumps(arguments, sort_keys=True, ensure_ascii=False)
    arg = getattr(tool, "argument", "input")
    value = arguments.get(arg)
    if not isinstance(value, str):
        raise ValueError(f"tool {tool.name!r} needs a string argument {arg!r}"
                         + (f", got {type(value).__name__}" if arg in arguments else ""))
    return value


def tool_turn_frame(tokenizer, schemas: list[dict], **template_kwargs) -> tuple[str, str]:
    """(head, tail): the text the chat template puts right after a call's `</tool_call>` and before the result,
    and after the result up to the next assistant turn's first generated token."""
    call = {"type": "function", "function": {"name": schemas[0]["function"]["name"], "arguments": {}}}
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def render(messages, generation):
        return tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False,
                                             add_generation_prompt=generation, **template_kwargs)

    text = render(conv + [{"role": "tool", "name": call["function"]["name"], "content": _MARK}], True)
    if text.count(_MARK) != 1:
        raise ValueError("tools.protocol=hermes: the chat template does not render a tool turn's content once")
    cut = text.rfind(CALL_CLOSE, 0, text.index(_MARK))
    if cut < 0:
        raise ValueError("tools.protocol=hermes: the tokenizer's chat template does not render tool calls as "
                         "<tool_call>…</tool_call> (use tools.protocol=tags)")
    cut += len(CALL_CLOSE)
    head, tail = text[cut:].split(_MARK)
    return head, tail


class HermesProtocol:
    """Native function calls through the tokenizer's chat template (see the module docstring)."""

    name = "hermes"
    needs_chat_template = True
    stop_strings = (CALL_CLOSE,)

    def __init__(self, tools: dict, tokenizer, **template_kwargs):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tools.protocol=hermes needs a tokenizer with a chat template (tool schemas and tool "
                             "turns are rendered by it)")
        self.tools = tools
        self.by_name: dict = {}
        for tool in tools.values():
            if tool.name in self.by_name:
                raise ValueError(f"two tools are named {tool.name!r}; hermes calls tools by name")
            self.by_name[tool.name] = tool
        self.schemas = [function_schema(t) for t in tools.values()]
        self.template_kwargs = template_kwargs
        head, tail = tool_turn_frame(tokenizer, self.schemas, **template_kwargs)
        self.frame = (head, tail)
        self.head_ids = template_ids(tokenizer.encode(head, add_special_tokens=False))
        self.tail_ids = template_ids(tokenizer.encode(tail, add_special_tokens=False))
        self.result_span = re.compile("(" + re.escape(head) + ".*?" + re.escape(tail) + ")", re.S)

    def parse(self, text: str) -> ToolCall | None:
        """The call `text` ends in (None when it does not end in `</tool_call>` after a `<tool_call>`); a bad
        call comes back with `error` set."""
        stripped = text.rstrip()
        if not stripped.endswith(CALL_CLOSE):
            return None
        end, body_end = len(stripped), len(stripped) - len(CALL_CLOSE)
        start = stripped.rfind(CALL_OPEN, 0, body_end)
        if start < 0:
            return None
        body = stripped[start + len(CALL_OPEN):body_end].strip()
        try:
            tag, content = self._resolve(body)
        except ValueError as exc:
            return ToolCall("", body, start, end, error=f"Error: {exc}")
        return ToolCall(tag, content, start, end)

    def _resolve(self, body: str) -> tuple[str, str]:
        """(tool tag, run text) of a call's JSON body."""
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the tool call is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError('a tool call must be a JSON object {"name": ..., "arguments": {...}}')
        tool = self.by_name.get(call["name"])
        if tool is None:
            raise ValueError(f"unknown tool {call['name']!r}; available: {', '.join(sorted(self.by_name))}")
        args = call.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ValueError("the tool call's arguments are not a JSON object") from None
        if not isinstance(args, dict):
            raise ValueError("the tool call's arguments must be a JSON object")
        return tool.tag, tool_input(tool, args)

    def result_text(self, result: ToolResult) -> str:
        head, tail = self.frame
        return f"{head}{result.text}{tail}"

    def result_ids(self, tokenizer, result: ToolResult) -> list[int]:
        return self.head_ids + literal_ids(tokenizer, result.text) + self.tail_ids

    def render_prompt(self, tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
        kw = {**self.template_kwargs, **template_kwargs}
        return template_ids(tokenizer.apply_chat_template(messages, tools=self.schemas, add_generation_prompt=True,
                                                          tokenize=True, **kw))

    def reply_messages(self, parts: list[tuple[str, str]]) -> list[dict]:
        """A reply as conversation history, in the template's own roles: each stretch of model text an assistant
        message (a call's `<tool_call>…</tool_call>` kept verbatim in its content — the template renders that
        exactly as it renders a structured `tool_calls` entry), each result a `tool` message. Re-rendered, the
        reply is the tokens the model saw (for Qwen2.5; Qwen3's template drops the `<think>` blocks of turns
        before a later user message, by design)."""
        return [{"role": "assistant", "content": text} if kind == "text" else {"role": "tool", "content": text}
                for kind, text in parts]


PROTOCOLS = ("tags", "hermes")


def make_protocol(name: str, tools: dict, tokenizer=None, **template_kwargs):
    """The protocol called `name` over `tools` (hermes needs the tokenizer with its chat template;
    `template_kwargs` — e.g. Qwen3's `enable_thinking` — go to every rendering, tool turns included)."""
    if name == "tags":
        return TagsProtocol(tools)
    if name == "hermes":
        if tokenizer is None:
            raise ValueError("tools.protocol=hermes needs the policy's tokenizer")
        return HermesProtocol(tools, tokenizer, **template_kwargs)
    raise ValueError(f"unknown tool protocol {name!r}: use one of {', '.join(PROTOCOLS)}")


__all__ = ["CALL_CLOSE", "CALL_OPEN", "HermesProtocol", "PROTOCOLS", "TagsProtocol", "function_schema",
           "literal_ids", "make_protocol", "template_ids", "tool_input", "tool_turn_frame"]
