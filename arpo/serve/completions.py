"""The bodies of `/v1/completions` and `/v1/chat/completions`: one job per request, replied whole or streamed.

Both endpoints fold a job's events into `Choice`s and differ in the prompt (text or token ids vs chat messages)
and in the reply's shape. In agent mode a chat prompt is rendered by the run's tool protocol (`tools.protocol`:
under `hermes` the tools' JSON schemas go through the chat template's `tools=`); a completion's prompt is the
client's own text or ids, as given. Streamed chat chunks carry `delta.content`; a tool call or result in
agent mode also rides in the chunk's `arpo` field (`{"tool_call": ...}` / `{"tool_result": ...}`) as it happens.
"""
from __future__ import annotations

import time

from fastapi import Request

from arpo.serve import schemas as S
from arpo.serve.app import COMPLETION_DEFAULT_MAX_TOKENS, _sse, request_id, streaming
from arpo.serve.choices import Choice
from arpo.serve.errors import APIError, bad_param
from arpo.serve.text import chat_prompt_ids, message_text


async def _start(server, req, request, prompt_ids, prompt_param, max_tokens, default_max, checked=None):
    stops, agent = checked or server._check_common(req)
    job, queue = await server.run(request, lambda: server._job(
        req, prompt_ids, prompt_param, max_tokens, default_max, stops, agent))
    choices = [Choice(i, server.tokenizer, stops) for i in range(req.n)]
    return job, queue, choices, agent


# ---------------------------------------------------------------------------------------------------- completions
async def complete(server, req: S.CompletionRequest, request: Request):
    if req.echo or req.suffix:
        raise bad_param("echo" if req.echo else "suffix", "not supported", "unsupported")
    if req.logprobs:
        raise bad_param("logprobs", "only 0 is supported: the sampler returns each sampled token's log-prob, not "
                        "the top alternatives", "unsupported")
    if isinstance(req.prompt, str):
        ids = chat_prompt_ids_text(server, req.prompt)
    else:
        ids = [int(t) for t in req.prompt]
    job, queue, choices, agent = await _start(server, req, request, ids, "prompt", req.max_tokens,
                                              COMPLETION_DEFAULT_MAX_TOKENS)
    rid, created = request_id("cmpl"), int(time.time())
    want_lp = req.logprobs is not None
    if req.stream:
        return streaming(_stream_completion(server, req, request, job, queue, choices, agent, rid, created,
                                            want_lp, len(ids)))
    async for evs in server.follow(request, job, queue):
        for ev in evs:
            if ev[0] != "error":
                choices[ev[1]].apply(ev)
    out = [S.CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                              logprobs=_completion_logprobs(c) if want_lp else None, arpo=c.extension(agent))
           for c in choices]
    return S.CompletionResponse(id=rid, created=created, model=server.model_name, choices=out,
                                usage=server.usage(len(ids), choices, req.n))


def chat_prompt_ids_text(server, text: str) -> list[int]:
    from dataclasses import replace

    from arpo.trainer.data import encode_prompt

    return encode_prompt(server.tokenizer, text, replace(server.data_section, chat_template=False))


def _completion_logprobs(c: Choice, ids=None, lps=None) -> S.CompletionLogprobs:
    ids = c.sampled_ids() if ids is None else ids
    lps = c.logprobs if lps is None else lps
    texts = c.token_texts(ids)
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return S.CompletionLogprobs(tokens=texts, token_logprobs=lps, text_offset=offsets)


async def _stream_completion(server, req, request, job, queue, choices, agent, rid, created, want_lp, P):
    def choice(c, text, finish, new_ids, new_lps):
        return {"index": c.index, "text": text, "finish_reason": c.finish_reason if finish else None,
                "logprobs": _completion_logprobs(c, new_ids, new_lps).model_dump() if want_lp and new_lps else None}

    base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
    async for chunk in _stream_events(server, req, request, job, queue, choices, base, P, choice, want_lp):
        yield chunk


async def _stream_events(server, req, request, job, queue, choices, base, P, choice, want_lp):
    """The SSE body both endpoints share: one write per batch of events (several steps when the front end is
    behind), each event a chunk whose choice `choice(c, text, finish, new_ids, new_logprobs)` shapes, with the
    token's id and entropy (or the tool record) under `arpo`; usage when asked; `[DONE]`."""
    try:
        async for evs in server.follow(request, job, queue):
            out = []
            for ev in evs:
                c = choices[ev[1]]
                n_lp = len(c.logprobs)
                text, record = c.apply(ev)
                new_lps = c.logprobs[n_lp:] if want_lp else []   # sampled_ids() walks the whole choice: only if asked
                item = choice(c, text, ev[0] == "finish", c.sampled_ids()[n_lp:] if new_lps else [], new_lps)
                if ev[0] == "token":
                    item["arpo"] = {"token_id": ev[2], "entropy": ev[4]}
                elif record is not None:
                    item["arpo"] = {record["type"]: record}
                out.append(_sse(dict(base, choices=[item])))
            yield "".join(out)
    except APIError as exc:
        yield _sse(exc.body())
        return
    if req.stream_options and req.stream_options.include_usage:
        yield _sse(dict(base, choices=[], usage=server.usage(P, choices, req.n).model_dump()))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------- chat
async def chat(server, req: S.ChatCompletionRequest, request: Request):
    if req.top_logprobs:
        raise bad_param("top_logprobs", "only 0 is supported: the sampler returns each sampled token's log-prob "
                        "(and the full-vocabulary entropy), not the top alternatives", "unsupported")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                for m in req.messages]
    checked = server._check_common(req)
    protocol = server.engine.protocol if checked[1] else None  # agent mode: the prompt shows the tools its way
    ids = chat_prompt_ids(server.tokenizer, messages, server.data_section, protocol)
    job, queue, choices, agent = await _start(server, req, request, ids, "messages",
                                              req.max_completion_tokens or req.max_tokens, None, checked)
    rid, created = request_id("chatcmpl"), int(time.time())
    if req.stream:
        return streaming(_stream_chat(server, req, request, job, queue, choices, agent, rid, created, len(ids)))
    async for evs in server.follow(request, job, queue):
        for ev in evs:
            choices[ev[1]].apply(ev)
    out = [S.ChatChoice(index=c.index, message=S.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                        logprobs=_chat_logprobs(c, c.sampled_ids(), c.logprobs) if req.logprobs else None,
                        arpo=c.extension(agent)) for c in choices]
    return S.ChatCompletionResponse(id=rid, created=created, model=server.model_name, choices=out,
                                    usage=server.usage(len(ids), choices, req.n))


def _chat_logprobs(c: Choice, ids, lps) -> S.ChoiceLogprobs:
    return S.ChoiceLogprobs(content=[S.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                     for t, lp in zip(c.token_texts(ids), lps)])


async def _stream_chat(server, req, request, job, queue, choices, agent, rid, created, P):
    def choice(c, text, finish, new_ids, new_lps):
        return {"index": c.index, "delta": {"content": text} if text else {},
                "finish_reason": c.finish_reason if finish else None,
                "logprobs": _chat_logprobs(c, new_ids, new_lps).model_dump() if req.logprobs and new_lps else None}

    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
    for c in choices:
        yield _sse(dict(base, choices=[{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]))
    async for chunk in _stream_events(server, req, request, job, queue, choices, base, P, choice,
                                      bool(req.logprobs)):
        yield chunk
