"""No request body can crash `arpo serve` or leak KV blocks, and every refusal names its parameter.

Hypothesis writes request bodies for both endpoints: each field is mostly valid, sometimes at or past its limits
(a prompt past the context, token ids outside the vocabulary, n in the hundreds, unknown roles) and now and then
any JSON at all (nested lists and dicts, huge integers, strings, null); optional fields left out at random. Every answer
must be either a 200 of the endpoint's shape (a stream ends with `[DONE]`, the usage adds up, no choice longer than
`max_tokens`) or an OpenAI error body whose `param` is named in its message; never a 500. After all of them the engine
holds no sequence and every block is free again."""
from __future__ import annotations

import json
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import serve_helpers as H  # noqa: E402

from arpo.serve.server import ServerThread, build_server  # noqa: E402
from arpo.serve.settings import ServeSettings  # noqa: E402

MODEL = "toy"

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def field(valid, edge):
    """Mostly a valid value, one time in 10 a value of the field's kind at or past its limits, one in 40 any
    JSON value."""
    return st.integers(0, 39).flatmap(lambda k: ANY_JSON if k == 0 else edge if k <= 4 else valid)


# field: (valid values, values at and past the limits)
SAMPLING = {
    "max_tokens": (st.integers(1, 6), st.integers(-1, 0) | st.just(10**6)),
    "temperature": (st.floats(0, 2), st.floats(-0.5, 0) | st.floats(2, 3)),
    "top_p": (st.floats(0.05, 1), st.floats(-0.1, 0.05) | st.floats(1, 1.2)),
    "top_k": (st.integers(-1, 60), st.integers(-3, -1) | st.integers(60, 10**6)),
    "n": (st.integers(1, 3), st.integers(-1, 0) | st.integers(4, 1000)),
    "seed": (st.integers(0, 2**31), st.integers(-2**65, 2**65)),
    "stop": (st.none() | st.text(max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=2),
             st.lists(st.text(max_size=3), max_size=6)),
    "stream": (st.booleans(), st.sampled_from(["yes", 1, 2])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"include_usage": 3})),
    "presence_penalty": (st.just(0.0), st.floats(-2, 2)), "frequency_penalty": (st.just(0.0), st.floats(-2, 2)),
    "user": (st.text(max_size=3), st.integers()),
    "arpo": (st.fixed_dictionaries({}, optional={"ignore_eos": st.booleans(), "agent": st.booleans(),
                                                 "max_tool_calls": st.integers(0, 2)}),
             st.fixed_dictionaries({"max_tool_calls": st.integers(-3, 0)}) | st.just({"other": 1})),
}
COMPLETION = {**SAMPLING,
              "prompt": (st.text(max_size=24) | st.lists(st.integers(0, 50), max_size=12),
                         st.lists(st.integers(-3, 10**6), max_size=12) | st.text(min_size=500, max_size=700)),
              "logprobs": (st.integers(0, 0) | st.none(), st.integers(-1, 6)), "echo": (st.just(False), st.just(True)),
              "suffix": (st.none(), st.text(min_size=1, max_size=2))}
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
    "content": st.text(max_size=24) | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                       "text": st.text(max_size=6)}), max_size=2)})
BAD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["tool", "robot", ""]), "content": st.text(max_size=4)})
CHAT = {**SAMPLING,
        "messages": (st.lists(MESSAGE, min_size=1, max_size=3),
                     st.lists(MESSAGE | BAD_MESSAGE, max_size=3)),
        "logprobs": (st.booleans(), st.just("all")),
        "top_logprobs": (st.integers(0, 0) | st.none(), st.integers(-1, 30)),
        "max_completion_tokens": (st.integers(1, 6), st.integers(-1, 0))}


def bodies(fields: dict, required: str):
    own = {k: field(*v) for k, v in fields.items()}
    model = field(st.just(MODEL), st.sampled_from(["gpt-4", "", MODEL.upper()]))
    return st.fixed_dictionaries({"model": model, required: own.pop(required)}, optional=own)


REQUESTS = (st.tuples(st.just("/v1/completions"), bodies(COMPLETION, "prompt"))
            | st.tuples(st.just("/v1/chat/completions"), bodies(CHAT, "messages")))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = H.make_checkpoint(str(tmp_path_factory.mktemp("fuzz")))
    server = build_server(checkpoint, H.config(), ServeSettings(model_name=MODEL), tools=["python"])
    with ServerThread(server) as st_:
        with httpx.Client(base_url=st_.url, timeout=120) as http:
            yield http


def _limit(body: dict) -> int | None:
    """The most tokens one choice may have, when the body asked for a valid limit."""
    for key in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] >= 1:
            return body[key]
    return None


def _check_ok(path: str, body: dict, resp: httpx.Response) -> None:
    if resp.headers["content-type"].startswith("text/event-stream"):
        assert body.get("stream") not in (None, False, 0), body  # pydantic's lax bools: "yes", 1, "on" stream too
        lines = [ln for ln in resp.text.splitlines() if ln.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", resp.text[-300:]
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        errors = [c for c in chunks if "error" in c]
        assert not errors or errors[0]["error"]["message"], errors
        return
    out = resp.json()
    assert out["object"] == ("text_completion" if path == "/v1/completions" else "chat.completion")
    limit, usage = _limit(body), out["usage"]
    counts = [len(c["arpo"]["token_ids"]) for c in out["choices"] if c.get("arpo") and "token_ids" in c["arpo"]]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if counts and (body.get("arpo") or {}).get("agent") is False:  # agent mode (the default here) appends results
        assert usage["completion_tokens"] == sum(counts)
        assert limit is None or max(counts) <= limit, (counts, limit)


def _check_answer(http: httpx.Client, path: str, body: dict) -> None:
    resp = http.post(path, json=body)
    if resp.status_code == 200:
        _check_ok(path, body, resp)
        return
    assert resp.status_code in (400, 404), (resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error
    param = error["param"]
    assert param and param.split(".")[0] in error["message"], error


def test_every_body_gets_an_answer_or_a_named_refusal_and_nothing_is_held(served):
    """The bodies, then the engine's state after all of them, in one test (so no worker ever checks a server
    that saw none): every sequence released, every block free, nothing in flight."""
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=REQUESTS)
    def bodies_answered(request):
        _check_answer(served, *request)

    bodies_answered()
    H.wait_for(lambda: served.get("/health").json()["sequences"] == 0, what="the engine to release everything")
    h = served.get("/health").json()
    assert h["status"] == "ok" and h["free_blocks"] == h["num_blocks"] and h["requests_in_flight"] == 0, h
    assert h["errors"] == 0, h  # no request failed inside the engine: refusals happen before it
