"""The HTTP front end: FastAPI endpoints that turn OpenAI requests into engine-loop jobs and events into replies.

    GET  /v1/models  /health        POST /v1/completions  /v1/chat/completions   (stream: server-sent events)

Everything here runs on the asyncio thread; the engine runs in its own process (`engine_loop.py`, reached
through `engine_client.EngineClient`), so tokenising, JSON and SSE here never hold up a decode step. A request is
validated and tokenised here, admitted (at most `max_requests` at once, else 503; also 503 once the engine process
is gone), submitted as a `Job`, and its events are consumed from an asyncio queue. A client that disconnects —
streamed or not — has its job cancelled, which releases its sequences and their KV blocks at the engine's next
turn. Stream chunks are plain
dicts serialised with `json.dumps` (they are built once per token per choice; pydantic would double the cost),
in exactly the shapes of the response models in `schemas.py`.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from arpo.engine import SamplingParams
from arpo.serve import schemas as S
from arpo.serve.choices import Choice
from arpo.serve.engine_loop import Job
from arpo.serve.errors import APIError, bad_param, install

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


class Server:
    def __init__(self, engine, data_section, settings, model_name: str):
        """`engine`: an `EngineClient` (the engine process); the server closes it when it shuts down."""
        self.engine, self.data_section, self.settings = engine, data_section, settings
        self.tools = engine.tools          # the tool names the engine process runs, or None
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.in_flight = 0
        self.created = int(time.time())
        self._mailbox: Mailbox | None = None

    # --- validation ---------------------------------------------------------------------------------------------
    def _check_common(self, req) -> tuple[tuple[str, ...], bool]:
        if req.model != self.model_name:
            raise APIError(400, f"model {req.model!r} does not exist here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.n > self.settings.max_n:
            raise bad_param("n", f"must be <= {self.settings.max_n} (max_n), got {req.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise bad_param(name, "penalties are not supported by this sampler; send 0", "unsupported")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_param("stop", f"at most 4 non-empty strings, got {stops!r}")
        agent = req.arpo.agent if req.arpo.agent is not None else self.tools is not None
        if agent and self.tools is None:
            raise bad_param("arpo.agent", "this server runs no tools (start it with --tools python)")
        return tuple(stops), agent

    def _job(self, req, prompt_ids: list[int], prompt_param: str, max_tokens: int | None, default_max: int | None,
             stops: tuple[str, ...], agent: bool) -> Job:
        P = len(prompt_ids)
        vocab = self.engine.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise bad_param(prompt_param, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not prompt_ids:
            raise bad_param(prompt_param, "the prompt is empty")
        if P >= self.max_model_len:
            raise APIError(400, f"{prompt_param}: the prompt has {P} tokens; this model's context is "
                           f"{self.max_model_len} tokens", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max or self.max_model_len, self.max_model_len - P)
        if P + max_tokens > self.max_model_len:
            raise APIError(400, f"max_tokens: {P} prompt tokens + max_tokens {max_tokens} exceed this model's "
                           f"context of {self.max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                                max_tokens=max_tokens, stop=stops, ignore_eos=req.arpo.ignore_eos)
        calls = self.settings.max_tool_calls if req.arpo.max_tool_calls is None else req.arpo.max_tool_calls
        return Job(prompt_ids, params, req.n, seed=req.seed, agent=agent, max_tool_calls=calls)

    # --- running ------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        if not self.engine.alive:
            raise APIError(503, f"the engine is not running: {self.engine.exit_reason}", code="engine_dead")
        if self.in_flight >= self.settings.max_requests:
            raise APIError(503, f"server busy: {self.in_flight} requests in flight (max_requests="
                           f"{self.settings.max_requests}); retry later", code="queue_full")
        self.in_flight += 1

    async def run(self, request: Request, make_job):
        """Admit one request and build its job; `follow` submits it and yields its events."""
        self._admit()
        try:
            job = make_job()
        except BaseException:
            self.in_flight -= 1
            raise
        return job, asyncio.Queue()

    async def follow(self, request: Request, job: Job, queue: asyncio.Queue):
        """Submit `job` and yield each burst of its events (one engine step, or several when this request was
        behind) until it is over; a client that goes away cancels it."""
        aloop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.aloop is not aloop:
            self._mailbox = Mailbox(aloop)
        post = self._mailbox.post
        self.engine.submit(job, lambda evs: post(queue, evs))
        watch = asyncio.ensure_future(_disconnected(request, queue))
        finished = 0
        try:
            while finished < job.n:
                evs = await queue.get()
                while not queue.empty():  # steps that landed while this request was being answered: one reply
                    evs = evs + queue.get_nowait()
                for e in evs:
                    if e[0] == "error":
                        raise APIError(500, e[1], code="engine_error")
                    if e[0] == "disconnected":
                        return
                finished += sum(1 for e in evs if e[0] == "finish")
                yield evs
        finally:
            watch.cancel()
            if finished < job.n:
                self.engine.cancel(job)
            self.in_flight -= 1

    def usage(self, prompt_len: int, choices: list[Choice], n: int) -> S.Usage:
        completion = sum(c.completion_tokens for c in choices)
        return S.Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                       total_tokens=prompt_len + completion,
                       arpo={"prompt_tokens_computed": prompt_len, "prompt_tokens_shared": (n - 1) * prompt_len,
                             "tool_result_tokens": sum(c.result_tokens for c in choices)})


class Mailbox:
    """Events from the engine client's reader thread to the requests' asyncio queues, with one wake-up of the
    event loop per burst rather than one per request per step: each wake-up is a write to the loop's self-pipe and
    a hand-over of the interpreter lock, and at 32 streams that per-request cost was a third of the server's
    time."""

    def __init__(self, aloop: asyncio.AbstractEventLoop):
        self.aloop = aloop
        self._lock = threading.Lock()
        self._pending: list = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, evs: list) -> None:
        """Called on the engine client's reader thread."""
        with self._lock:
            self._pending.append((queue, evs))
            if self._scheduled:
                return
            self._scheduled = True
        self.aloop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        for queue, evs in items:
            queue.put_nowait(evs)


async def _disconnected(request: Request, queue: asyncio.Queue) -> None:
    """Posts ("disconnected",) to the request's event queue when its client goes away (one watcher per request,
    so that waiting for the next events is one `queue.get`, not a new task and a wait per step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait([("disconnected",)])
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------------- endpoints
def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.engine.close)

    app = FastAPI(title="arpo serve", lifespan=lifespan)
    app.state.server = server
    install(app)

    @app.get("/health")
    async def health():
        """The engine's counters as of its last step (free KV blocks, sequences, jobs, cancelled, errors); 503 with
        the reason once the engine process is gone."""
        body = {"status": "ok", "model": server.model_name, "requests_in_flight": server.in_flight,
                "engine_pid": server.engine.pid, **server.engine.snapshot}
        if not server.engine.alive:
            body.update(status="engine_dead", error=server.engine.exit_reason)
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        return S.ModelList(data=[S.ModelCard(id=server.model_name, created=server.created,
                                             max_model_len=server.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: S.CompletionRequest, request: Request):
        from arpo.serve.completions import complete

        return await complete(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        from arpo.serve.completions import chat

        return await chat(server, req, request)

    return app


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def streaming(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

