"""`arpo serve` through the official openai client, against a server on 127.0.0.1 (a free port) on a tiny model.

The tiny model is the scripted tool-chain Qwen2 (see serve_helpers.py); its greedy output repeats `<python>`,
sampled it writes `<python>870+5522+124</python>` calls that the real sandbox runs."""
from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import serve_helpers as H  # noqa: E402

from arpo.engine import SamplingParams  # noqa: E402
from arpo.serve.server import ServerThread, build_server  # noqa: E402
from arpo.serve.settings import ServeSettings  # noqa: E402

MODEL = "toy"
PLAIN = {"arpo": {"agent": False}}
QUESTION = "Q: 1*2+3=?"
AGENT_SEED = 8  # with this seed the toy policy's first call is `870+5522+124`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return H.make_checkpoint(str(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def served(checkpoint):
    server = build_server(checkpoint, H.config(), ServeSettings(model_name=MODEL), tools=["python"])
    with ServerThread(server) as st:
        yield st


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """A second engine on the same checkpoint, driven directly (the reference outputs)."""
    from arpo.build import build_engine, load_policy

    cfg = H.config()
    model, tok = load_policy(checkpoint, cfg.model)
    return build_engine(model, tok, cfg, 8)


def _prompt_ids(tok, text):
    return [tok.bos_token_id] + list(tok.encode(text, add_special_tokens=False))


def _health(served):
    return httpx.get(served.url + "/health", timeout=30).json()


def test_models_and_health(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = _health(served)
    assert h["status"] == "ok" and h["free_blocks"] == h["num_blocks"]


def test_completion_equals_offline_greedy(client, offline):
    r = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=24, temperature=0, extra_body=PLAIN)
    ref = offline.generate([_prompt_ids(offline.tokenizer, QUESTION)], SamplingParams(temperature=0,
                                                                                       max_tokens=24))[0]
    choice = r.choices[0]
    assert choice.model_extra["arpo"]["token_ids"] == ref.token_ids
    assert choice.text == offline.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(_prompt_ids(offline.tokenizer, QUESTION))
    assert r.usage.completion_tokens == 24


def test_chat_equals_offline_greedy_with_logprobs_and_entropy(client, offline):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=20, temperature=0, logprobs=True, extra_body=PLAIN)
    ref = offline.generate([_prompt_ids(offline.tokenizer, QUESTION)], SamplingParams(temperature=0,
                                                                                       max_tokens=20))[0]
    c = r.choices[0]
    assert c.message.content == offline.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    assert [t.logprob for t in c.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-5)
    assert c.model_extra["arpo"]["entropies"] == pytest.approx(ref.entropies, abs=1e-5)


@pytest.mark.parametrize("stop", [None, ["on><p", "99*"]])
def test_stream_chunks_concatenate_to_the_non_streamed_text(client, stop):
    kw = dict(model=MODEL, max_tokens=40, temperature=1.0, seed=5, stop=stop, extra_body=PLAIN)
    whole = client.completions.create(prompt=QUESTION, **kw)
    chunks = list(client.completions.create(prompt=QUESTION, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    if stop:
        assert whole.choices[0].finish_reason == "stop" and not any(s in whole.choices[0].text for s in stop)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
    kw = dict(model=MODEL, max_tokens=12, temperature=1.0, seed=3, extra_body=PLAIN)
    whole = client.completions.create(prompt=QUESTION, logprobs=0, **kw).choices[0].logprobs
    chunks = list(client.completions.create(prompt=QUESTION, logprobs=0, stream=True, **kw))
    streamed = [lp for ch in chunks if ch.choices[0].logprobs for lp in ch.choices[0].logprobs.token_logprobs]
    assert len(whole.token_logprobs) == 12 and streamed == pytest.approx(whole.token_logprobs, abs=1e-6)
    plain = list(client.completions.create(prompt=QUESTION, stream=True, **kw))
    assert not any(ch.choices[0].logprobs for ch in plain)   # not asked: none sent
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(messages=messages, logprobs=True, **kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(messages=messages, logprobs=True, stream=True, **kw))
    streamed = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in whole], abs=1e-6)


def test_n4_with_a_seed_is_reproducible_and_counts_the_prompt_once(client):
    kw = dict(model=MODEL, prompt=QUESTION, max_tokens=30, temperature=1.0, n=4, seed=11, extra_body=PLAIN)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) > 1  # the four choices sample independently
    P = a.usage.prompt_tokens
    assert P == 11 and a.usage.model_extra["arpo"]["prompt_tokens_shared"] == 3 * P
    assert a.usage.completion_tokens == sum(len(c.model_extra["arpo"]["entropies"]) for c in a.choices)


def test_16_concurrent_requests_match_one_by_one(client):
    prompts = [f"Q: {100 + 37 * i}*{10 + i}+{i}=?" for i in range(16)]

    def ask(i):
        kw = dict(temperature=0) if i % 2 else dict(temperature=1.0, seed=i)
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=32, extra_body=PLAIN,
                                         **kw).choices[0].text
    one_by_one = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == one_by_one


@pytest.mark.parametrize("kw, status, param", [
    (dict(model="gpt-4"), 400, "model"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(n=0), 400, "n"),
    (dict(n=99), 400, "n"),
    (dict(top_p=0), 400, "top_p"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=10_000), 400, "max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(logprobs=True, top_logprobs=3), 400, "top_logprobs"),
    (dict(messages=[{"role": "user", "content": "Q: " + "1" * 600}]), 400, "messages"),
    (dict(messages=[]), 400, "messages"),
])
def test_bad_inputs_get_openai_errors_naming_the_parameter(client, kw, status, param):
    args = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, extra_body=PLAIN)
    args.update(kw)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == status
    body = err.value.body
    assert body["param"] == param and param in body["message"], body


def test_bad_token_ids_and_unsupported_agent_are_named(client):
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 5, 10_000], max_tokens=4, extra_body=PLAIN)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=[1] * 600, max_tokens=4, extra_body=PLAIN)


def test_queue_full_is_503_and_names_the_limit(checkpoint):
    server = build_server(checkpoint, H.config(), ServeSettings(model_name=MODEL, max_requests=1))
    with ServerThread(server) as st:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=120)
        server.engine.pause()  # the first request stays in flight until resumed
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.completions.create(
            model=MODEL, prompt=QUESTION, max_tokens=8, temperature=0)))
        t.start()
        H.wait_for(lambda: _health(st)["requests_in_flight"] == 1, what="the first request to be admitted")
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model=MODEL, prompt=QUESTION, max_tokens=8)
        assert err.value.status_code == 503 and "max_requests=1" in err.value.body["message"]
        server.engine.resume()
        t.join(60)
        assert first["r"].choices[0].finish_reason == "length"


def test_a_client_disconnecting_mid_stream_frees_its_blocks(served):
    loop = served.server.engine
    before = _health(served)
    body = {"model": MODEL, "prompt": QUESTION, "max_tokens": 400, "temperature": 1.0, "n": 3, "stream": True,
            "arpo": {"agent": False, "ignore_eos": True}}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", served.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = []
            for line in lines:
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:]))
                    if len(got) >= 6:
                        break
            loop.pause()
            h = _health(served)
            assert h["sequences"] == 3 and h["free_blocks"] < h["num_blocks"]  # still generating
        # leaving the block closes the connection with the generation unfinished
    try:
        H.wait_for(lambda: _health(served)["sequences"] == 0, what="the cancelled sequences to be released")
        h = _health(served)
        assert h["free_blocks"] == h["num_blocks"]
        assert h["cancelled"] == before["cancelled"] + 1
    finally:
        loop.resume()


def test_agent_mode_transcript_holds_the_real_sandbox_output(client, served):
    from arpo.tools.sandbox import PythonSandbox

    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=1.0,
                                       seed=AGENT_SEED)
    ext = r.choices[0].model_extra["arpo"]
    calls = [x for x in ext["transcript"] if x["type"] == "tool_call"]
    results = [x for x in ext["transcript"] if x["type"] == "tool_result"]
    assert calls and results, f"seed {AGENT_SEED} made no tool call: {r.choices[0].message.content!r}"
    assert calls[0]["input"] == "870+5522+124"
    sandbox = PythonSandbox(timeout_s=10)
    try:
        assert results[0]["ok"] and results[0]["output"] == sandbox.run(calls[0]["input"]).text == "6516"
    finally:
        sandbox.close()
    text = r.choices[0].message.content
    from arpo.tools.base import format_result

    assert "".join(x["text"] if x["type"] == "text" else format_result(x["output"]) if x["type"] == "tool_result"
                   else "" for x in ext["transcript"]) == text
    assert "<python>870+5522+124</python> <result>\n6516\n</result>" in text
    assert r.usage.model_extra["arpo"]["tool_result_tokens"] > 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=1.0,
                                                 seed=AGENT_SEED, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    shown = [ch.choices[0].model_extra.get("arpo", {}) for ch in chunks]
    assert any("tool_call" in s and s["tool_call"]["input"] == "870+5522+124" for s in shown)
    assert any("tool_result" in s and s["tool_result"]["output"] == "6516" for s in shown)
    h = _health(served)
    assert h["free_blocks"] == h["num_blocks"] and h["sequences"] == 0


def _gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_dead_engine_process_shows_in_health_and_fails_requests_by_name(checkpoint):
    import os
    import signal

    server = build_server(checkpoint, H.config(), ServeSettings(model_name=MODEL))
    with ServerThread(server) as st:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=120)
        server.engine.pause()  # a request in flight when the engine dies
        first = {}

        def ask():
            try:
                c.completions.create(model=MODEL, prompt=QUESTION, max_tokens=8, extra_body=PLAIN)
            except openai.APIStatusError as exc:
                first["err"] = exc

        t = threading.Thread(target=ask)
        t.start()
        H.wait_for(lambda: _health(st)["requests_in_flight"] == 1, what="the request to be admitted")
        pid = _health(st)["engine_pid"]
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert first["err"].status_code == 500 and "engine process exited" in first["err"].body["message"]
        r = httpx.get(st.url + "/health", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "engine_dead"
        assert "exit code -9" in r.json()["error"]
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model=MODEL, prompt=QUESTION, max_tokens=8, extra_body=PLAIN)
        assert err.value.status_code == 503 and err.value.body["code"] == "engine_dead"


def test_shutdown_stops_the_engine_process_and_its_sandboxes(checkpoint):
    server = build_server(checkpoint, H.config(), ServeSettings(model_name=MODEL), tools=["python"])
    with ServerThread(server) as st:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                      max_tokens=80, temperature=1.0, seed=AGENT_SEED)
        assert r.choices[0].model_extra["arpo"]["tool_calls"] >= 1   # the sandbox pool is running
        pid = _health(st)["engine_pid"]
        kids = _children(pid)
        assert kids, "the engine process started no sandbox"
    assert server.engine.process.returncode == 0           # it stopped when asked, not killed
    assert _gone(pid) and all(_gone(k) for k in kids)


def _children(pid: int) -> list[int]:
    import glob

    out = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(path).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(path.split("/")[2]))
    return out


def test_the_engine_process_exits_when_its_front_end_is_killed(checkpoint, tmp_path):
    """A front end killed with SIGKILL runs no cleanup: the engine process must notice its pipe closing."""
    import os
    import subprocess

    script = (f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
              "import serve_helpers as H\n"
              "from arpo.serve.engine_client import EngineClient\n"
              f"e = EngineClient({checkpoint!r}, H.config(), 4)\n"
              "print(e.pid, flush=True)\n"
              "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == -9, proc.stderr
    pid = int(proc.stdout.split()[0])
    H.wait_for(lambda: _gone(pid) or _zombie(pid), what="the orphaned engine process to exit")


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
