"""Agent mode: the run's tool protocol (`tools.protocol`) inside the server's engine loop, one choice at a time.

The same protocol objects as the rollout (`arpo/tools/protocol.py`, through the executor; see
`arpo/rollout/tree_rollout.py`): a choice stops at the protocol's stop string (`</python>` under `tags`,
`</tool_call>` under `hermes`), the protocol parses the call from the choice's output — under `hermes` malformed
JSON or an unknown tool is a call carrying an error, which the executor returns as the result the model sees —
and the call runs on the tool executor's pool while the other sequences keep decoding. When the future is done its
callback posts a command to the engine loop, which appends the protocol's result tokens (` <result>…</result>`,
or the chat template's tool turn ending in a new assistant turn's header; special-token text in a result stays
plain text) with `extend`, prefilled into the same cache: token-in/token-out, nothing sampled is re-tokenised.
A stop string without its opening tag is plain text (the choice resumes); after `max_tool_calls` calls the stop
strings are plain text; a result that would pass the model's context ends the choice with finish reason
`length`. All methods run on the engine process's loop (its main thread).
"""
from __future__ import annotations

from dataclasses import replace


class ToolTurns:
    def __init__(self, engine, tools, post):
        self.engine, self.tools, self._post = engine, tools, post
        self.tokenizer = engine.tokenizer
        self.stop_strings = tuple(tools.stop_strings)

    def is_tool_stop(self, job, i: int, out) -> bool:
        return (out.finish_reason == "stop" and isinstance(out.stop_reason, str)
                and out.stop_reason in self.stop_strings and out.stop_reason not in job.params.stop
                and job.calls[i] < job.max_tool_calls)

    def on_stop(self, job, i: int, out, finish) -> list[tuple]:
        """A choice stopped at a closing tag: submit its call (or resume when there is none)."""
        sid = job.seq_ids[i]
        seq = self.engine.sequence(sid)
        text = self.tokenizer.decode(seq.token_ids[seq.prompt_len:], skip_special_tokens=True)
        call = self.tools.parse(text)
        if call is None:
            if seq.num_sampled >= job.params.max_tokens:
                return finish(job, i, "length", None)
            self.engine.resume(sid)
            return []
        job.calls[i] += 1
        future = self.tools.submit(call)
        future.add_done_callback(lambda f, job=job, i=i: self._post(("tool", job, i, f)))
        return [("call", i, call.tag, call.content, call.error)]

    def on_result(self, job, i: int, future, finish) -> list[tuple]:
        """A call finished: append its result and let the choice sample on (or end it when it cannot fit)."""
        result = self.tools.result_of(future)
        ids = [int(t) for t in self.tools.protocol.result_ids(self.tokenizer, result)]
        sid = job.seq_ids[i]
        seq = self.engine.sequence(sid)
        if seq.num_tokens + len(ids) >= self.engine.max_model_len or seq.num_sampled >= job.params.max_tokens:
            return [("result", i, result, [])] + finish(job, i, "length", None)
        last = job.calls[i] >= job.max_tool_calls  # tool tags are plain text from here on
        self.engine.extend(sid, ids, params=replace(seq.params, stop=job.params.stop) if last else None)
        return [("result", i, result, ids)]
