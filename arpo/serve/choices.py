"""What the front end keeps per choice while a request runs: its text stream, tokens, statistics and transcript.

The engine loop sends events (see `engine_loop.py`); `Choice.apply` turns one into the text to stream now and the
agent's call/result records. The same object answers a non-streamed request at the end (`text`, `logprobs`, ...),
so a streamed and a non-streamed request run the same code and differ only in when it is sent.
"""
from __future__ import annotations

from arpo.serve.text import TextStream


class Choice:
    def __init__(self, index: int, tokenizer, stops: tuple[str, ...]):
        self.index = index
        self.tokenizer = tokenizer
        self.stream = TextStream(tokenizer, stops)
        self.token_ids: list[int] = []        # sampled tokens and appended tool results, in order
        self.sampled: list[bool] = []
        self.logprobs: list[float] = []       # per sampled token
        self.entropies: list[float] = []
        self.transcript: list[dict] = []
        self.finish_reason: str | None = None
        self.stop_reason = None
        self._mark = 0                        # where the current model-text segment starts in stream.text

    @property
    def completion_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def result_tokens(self) -> int:
        return len(self.token_ids) - len(self.logprobs)

    def apply(self, ev: tuple) -> tuple[str, dict | None]:
        """(text delta to send now, tool record to send now or None)."""
        kind = ev[0]
        if kind == "token":
            _, _, tok, lp, ent = ev
            self.token_ids.append(tok)
            self.sampled.append(True)
            self.logprobs.append(lp)
            self.entropies.append(ent)
            self.stream.push([tok])
            return self.stream.delta(), None
        if kind == "call":
            _, _, tag, content, error = ev
            self._segment(self.stream.text)
            record = {"type": "tool_call", "tool": tag, "input": content}
            if error:  # the protocol could not make a call of it (hermes: bad JSON, unknown tool): `input` is the
                record["error"] = error  # call's text as written, and the error is the result the model sees
            self.transcript.append(record)
            return self.stream.delta(), record
        if kind == "result":
            _, _, result, ids = ev
            self.token_ids.extend(ids)
            self.sampled.extend([False] * len(ids))
            self.stream.push(ids)
            self._mark = len(self.stream.text)
            record = {"type": "tool_result", "output": result.text, "ok": bool(result.ok),
                      "latency_s": round(float(result.latency_s), 4), "appended": bool(ids)}
            self.transcript.append(record)
            return self.stream.delta(), record
        if kind == "finish":
            _, _, reason, stop = ev
            self.finish_reason = reason
            self.stop_reason = stop if isinstance(stop, str) else None
            delta = self.stream.final(self.stop_reason)
            self._segment(self.text)
            return delta, None
        raise ValueError(f"unknown engine event {kind!r}")

    def _segment(self, upto: str) -> None:
        piece = upto[self._mark:]
        if piece:
            self.transcript.append({"type": "text", "text": piece})
        self._mark = len(upto)

    @property
    def text(self) -> str:
        return self.stream.full_text(self.stop_reason)

    def parts(self) -> list[tuple[str, str]]:
        """The reply so far as ("text", model text) and ("result", tool output) pieces in order — the results
        that were appended, and the text not yet closed into a segment (a reply cut short by Ctrl-C) — for a tool
        protocol's `reply_messages`."""
        out = [("text", r["text"]) if r["type"] == "text" else ("result", r["output"]) for r in self.transcript
               if r["type"] == "text" or (r["type"] == "tool_result" and r["appended"])]
        if self.finish_reason is None and len(self.stream.text) > self._mark:
            out.append(("text", self.stream.text[self._mark:]))
        return out

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]

    def sampled_ids(self) -> list[int]:
        return [t for t, s in zip(self.token_ids, self.sampled) if s]

    def extension(self, agent: bool) -> dict:
        ext = {"token_ids": self.token_ids, "entropies": self.entropies}
        if agent:
            ext["transcript"] = self.transcript
            ext["tool_calls"] = sum(1 for r in self.transcript if r["type"] == "tool_call")
        return ext
