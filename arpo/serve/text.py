"""Text in and out of the server: chat messages to prompt ids, and token ids to streamed text.

Chat prompts: the checkpoint tokenizer's chat template when it has one (and `data.chat_template` is on), through
the trainer's own `encode_prompt`, so a served policy sees the prompt format it was trained on. Without a
template (the embedded character tokenizer) the plain format: the messages' contents in order, a newline before
each user or system message after the first, assistant turns appended as they were generated — one user message
is exactly the training prompt (`Q: 123*45+6=?`).

Streaming: `TextStream` decodes incrementally (a window of the previous tokens, as vLLM does, so multi-byte
characters and leading-space tokens come out right) and holds back the last `len(stop)` characters while a
user stop string may still be completing, so the streamed chunks concatenate to exactly the non-streamed text,
which ends before the stop string (OpenAI's behaviour).
"""
from __future__ import annotations


def message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of `{type: text, text}` parts."""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_prompt_ids(tokenizer, messages: list[dict], data_section, protocol=None) -> list[int]:
    """The prompt ids of a conversation; with a tool `protocol` (agent mode) rendered its way, as the rollout
    renders training prompts (hermes: the tools' schemas through the chat template)."""
    from arpo.trainer.data import encode_prompt, has_chat_template

    if data_section.chat_template and has_chat_template(tokenizer):
        return encode_prompt(tokenizer, messages, data_section, protocol)
    text = ""
    for k, m in enumerate(messages):
        if k and m["role"] != "assistant":
            text += "\n"
        text += m["content"]
    return encode_prompt(tokenizer, text, data_section, protocol)


def cut_at_stop(text: str, stop: str | None) -> str:
    if not stop:
        return text
    at = text.rfind(stop)
    return text if at < 0 else text[:at]


class TextStream:
    """Token ids in, text deltas out (see the module docstring)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        # the delta after a token is taken before the engine says whether that token completed a stop string, so
        # the whole length of the longest one stays back
        self.holdback = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def delta(self) -> str:
        """New text safe to send (a possible stop string's start held back)."""
        end = len(self.text) - self.holdback
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:end], end
        return out

    def final(self, stop: str | None = None) -> str:
        """The rest of the text at the end of a choice, cut before the stop string that ended it."""
        if self._read < len(self.ids):
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._prefix = self._read = len(self.ids)
        full = cut_at_stop(self.text, stop)
        out = full[self._sent:] if len(full) > self._sent else ""
        self._sent = max(self._sent, len(full))
        return out

    def full_text(self, stop: str | None = None) -> str:
        return cut_at_stop(self.text, stop)
