"""`arpo chat CHECKPOINT [--tools python,search]`: a terminal conversation with a checkpoint, in process.

The same machinery as `arpo serve` without HTTP: the engine process (`EngineClient`) owns the engine, each turn
is a `Job` whose events a `Choice` turns into text (so the prompt format, the agent's tool protocol and the streamed
text are the server's, byte for byte). The history is the list of messages; each turn's prompt is the whole history
through `chat_prompt_ids` (the checkpoint's chat template — with tools, rendered by the run's `tools.protocol`, so under
`hermes` the tools' schemas go in through the template's `tools=` — or the plain format of the embedded character
tokenizer). The assistant's reply goes back into it as the protocol says (`reply_messages`): under `tags` one
assistant message with the tool calls and `<result>` blocks as the model produced them; under `hermes` the
template's own turns — assistant text ending in its `<tool_call>`, a `tool` message with the result, the next
assistant turn — which re-render as the tokens the model saw. Within a reply everything is token-in/token-out:
the tool loop is the server's agent mode (`agent.py`).

Commands: `/reset` (forget the history), `/exit` (or Ctrl-D). Ctrl-C during a reply stops that reply (its
sequence is cancelled and its KV blocks freed; the part already shown stays in the history) and returns to the
prompt; Ctrl-C at the prompt clears the line.
"""
from __future__ import annotations

import queue
import sys

from arpo.engine import SamplingParams
from arpo.serve.choices import Choice
from arpo.serve.engine_loop import Job
from arpo.serve.text import chat_prompt_ids
from arpo.serve.settings import ChatSettings
from arpo.tools.protocol import TagsProtocol

PROMPT = "you> "
REPLY = "agent> "


class ChatSession:
    """One conversation. `read()` returns the next input line (raises EOFError at the end); `write(text)`
    shows text (no newline added). Runs on the calling thread; the engine runs in its process (`engine`, an
    `EngineClient`; whoever started it closes it)."""

    def __init__(self, engine, data_section, settings: ChatSettings | None = None, read=input, write=None):
        self.engine, self.data_section = engine, data_section
        self.tools = engine.tools            # the tool names the engine process runs, or None
        self.settings = settings or ChatSettings()
        self.tokenizer = engine.tokenizer
        self.read = read
        self.write = write or _stdout_write
        self.messages: list[dict] = []
        self.protocol = engine.protocol      # how tools and their turns are rendered (None without tools)
        self.turns = 0

    # --- the session --------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.write(self._banner())
        while True:
            try:
                line = self.read(PROMPT)
            except KeyboardInterrupt:
                self.write("\n(Ctrl-C stops a reply; /exit or Ctrl-D leaves)\n")
                continue
            except EOFError:
                self.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line):
                    return
                continue
            self.reply(line)

    def _banner(self) -> str:
        tools = f"{', '.join(self.tools)} ({self.protocol.name})" if self.tools is not None else "none"
        return (f"arpo chat: context {self.engine.max_model_len} tokens, tools: {tools}. "
                "/reset forgets the history, /exit leaves, Ctrl-C stops a reply.\n")

    def _command(self, line: str) -> bool:
        """True when the session should end."""
        cmd = line.split()[0]
        if cmd in ("/exit", "/quit"):
            return True
        if cmd == "/reset":
            self.messages.clear()
            self.write("(history cleared)\n")
            return False
        self.write(f"unknown command {cmd!r}; commands: /reset, /exit\n")
        return False

    # --- one turn -----------------------------------------------------------------------------------------------
    def reply(self, text: str) -> Choice | None:
        """Answer one user message (streamed through `write`); returns its choice, None when refused."""
        self.messages.append({"role": "user", "content": text})
        ids = chat_prompt_ids(self.tokenizer, self.messages, self.data_section, self.protocol)
        room = self.engine.max_model_len - len(ids)
        if room < 2:
            self.messages.pop()
            self.write(f"(the conversation has {len(ids)} tokens; the context is {self.engine.max_model_len}: "
                       "/reset to start over)\n")
            return None
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = self._job(ids, min(self.settings.max_tokens, room - 1))
        choice = Choice(0, self.tokenizer, ())
        self.turns += 1
        self.write(REPLY)
        self.engine.submit(job, events.put)
        try:
            self._follow(job, events, choice)
        except KeyboardInterrupt:
            self.engine.cancel(job)
            self.write(" [interrupted]")
        self.write("\n")
        parts = choice.parts()
        if parts:
            self.messages += (self.protocol or TagsProtocol({})).reply_messages(parts)
        return choice

    def _job(self, ids: list[int], max_tokens: int) -> Job:
        s = self.settings
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=max_tokens)
        seed = None if s.seed < 0 else s.seed + self.turns
        return Job(ids, params, 1, seed=seed, agent=self.tools is not None, max_tool_calls=s.max_tool_calls)

    def _follow(self, job: Job, events: queue.SimpleQueue, choice: Choice) -> None:
        while True:
            try:  # a short timeout keeps the wait interruptible by Ctrl-C
                evs = events.get(timeout=0.1)
            except queue.Empty:
                continue
            for ev in evs:
                if ev[0] == "error":
                    self.write(f"\n(error: {ev[1]})")
                    return
                text, record = choice.apply(ev)
                if record is not None and record["type"] == "tool_result":
                    status = "ok" if record["ok"] else "failed"
                    self.write(f"\n  [tool result: {status}, {record['latency_s']:.2f} s]\n")
                self.write(text)
                if record is not None and record["type"] == "tool_call":
                    self.write(f"\n  [bad tool call: {record['error']}]" if "error" in record
                               else f"\n  [running {record['tool']}: {record['input']}]")
                if ev[0] == "finish":
                    return


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
