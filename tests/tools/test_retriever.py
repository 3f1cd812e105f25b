"""`HttpSearch(protocol="retriever")` against a Search-R1-style retrieval server started here on 127.0.0.1:
its request and answer format, several queries a request, malformed answers, a 500 and a hang, mid-rollout too."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from arpo.tools import HttpSearch, ToolCall, ToolExecutor, load_tool

CORPUS = [{"contents": '"Cats"\nCats purr and chase mice.'}, {"contents": '"Dogs"\nDogs bark at cats.'},
          {"contents": '"Mice"\nMice eat cheese.'}]


class Retriever(BaseHTTPRequestHandler):
    """`POST /retrieve {"queries", "topk", "return_scores"}` -> `{"result": [[{"document", "score"}...]...]}`,
    ranked by how many query words a document holds. Queries with these words misbehave: `boom` (the whole
    request answers 500), `hang` (no answer until the test ends), `garbage` (a 200 that is not JSON), `broken` (its
    own hit list is malformed). Digit queries (the toy policy's) hit a document per digit; one with a 7 is a
    `boom`, one with a 9 a `hang`."""

    requests: list = []
    release = threading.Event()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.path != "/retrieve" or set(body) != {"queries", "topk", "return_scores"}:
            return self._send(400, b"{}")
        words = " ".join(body["queries"])
        firsts = {q[:1] for q in body["queries"]}
        if "hang" in words or "9" in firsts:
            type(self).release.wait(30)
            return
        if "boom" in words or "7" in firsts:
            return self._send(500, b"internal error")
        if "garbage" in words:
            return self._send(200, b"<html>oops</html>")
        result = [self._hits(q, body["topk"]) for q in body["queries"]]
        self._send(200, json.dumps({"result": result}).encode())

    @staticmethod
    def _hits(query: str, k: int):
        if "broken" in query:
            return [{"document": {"title": "no contents"}, "score": 1.0}]
        if query[:1].isdigit():
            return [{"document": {"contents": f'"d{d}"\nabout {d}'}, "score": 1.0} for d in query[:k]]
        q = set(query.lower().split())
        scored = [(len(q & set(re.findall(r"[a-z]+", d["contents"].lower()))), d) for d in CORPUS]
        return [{"document": d, "score": float(s)} for s, d in sorted(scored, key=lambda x: -x[0])[:k] if s]

    def _send(self, code: int, data: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    Retriever.requests, Retriever.release = [], threading.Event()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Retriever)  # port 0: a free one
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/retrieve"
    Retriever.release.set()
    srv.shutdown()
    srv.server_close()


def _search(url, **kw):
    kw.setdefault("retries", 0)
    return HttpSearch(url, protocol="retriever", top_k=2, **kw)


def test_results_in_the_retriever_format(url):
    res = _search(url).run("cats")
    assert res.ok and res.text == "Page 1: Cats\nCats purr and chase mice.\nPage 2: Dogs\nDogs bark at cats."
    assert Retriever.requests == [{"queries": ["cats"], "topk": 2, "return_scores": True}]
    assert _search(url).run("zebra").text == "No results found."


def test_several_queries_go_in_one_request(url):
    results = _search(url).run_batch(["cats", "cheese", " cats ", ""])
    assert [r.ok for r in results] == [True, True, True, False]
    assert results[1].text == "Page 1: Mice\nMice eat cheese." and results[2] == results[0]
    assert "empty search query" in results[3].text
    assert Retriever.requests == [{"queries": ["cats", "cheese"], "topk": 2, "return_scores": True}]
    _search(url, max_batch=1).run_batch(["cats", "cheese"])
    assert [r["queries"] for r in Retriever.requests[1:]] == [["cats"], ["cheese"]]


def test_malformed_answers_and_http_errors_are_error_results(url):
    ok, broken = _search(url).run_batch(["cats", "broken cats"])
    assert ok.ok and not broken.ok and "lacks document.contents" in broken.text
    garbage = _search(url).run_batch(["cats garbage", "dogs"])  # one request: both fail
    assert [r.ok for r in garbage] == [False, False] and "JSONDecodeError" in garbage[1].text
    boom = _search(url, retries=1, backoff_s=0.01).run("boom")
    assert not boom.ok and "after 2 attempts" in boom.text and "HTTP Error 500" in boom.text
    hang = _search(url, timeout_s=0.2).run("hang")
    assert not hang.ok and "timed out" in hang.text


def test_the_executor_sends_calls_submitted_together_in_one_request(url):
    with ToolExecutor({"search": _search(url)}, max_workers=2) as ex:
        calls = [ToolCall("search", q, 0, 0) for q in ("cats", "dogs", "cats", "boom")]
        results = [ex.result_of(f) for f in ex.submit_many(calls)]
        assert [r["queries"] for r in Retriever.requests] == [["cats", "dogs", "boom"]]
        assert not any(r.ok for r in results)  # the 500 fails the whole request
        results = ex.run_many([ToolCall("search", q, 0, 0) for q in ("cats", "dogs")])
        assert all(r.ok for r in results) and Retriever.requests[-1]["queries"] == ["cats", "dogs"]
        assert ex.run(ToolCall("search", "cats", 0, 0)).meta.get("cached")  # repeats come from the cache


def test_the_search_tool_and_config_select_the_protocol(url):
    from arpo.config import ConfigError, load_config
    from arpo.build import build_tools

    assert load_tool("search", url=url, protocol="retriever").run("cats").ok
    with pytest.raises(ValueError, match="protocol must be one of arpo, retriever"):
        HttpSearch(url, protocol="search-r1")
    cfg = load_config(overrides=[f"tools.search_url={url}", "tools.search_protocol=retriever",
                                 "tools.enabled=[search]"])
    with build_tools(cfg) as ex:
        assert ex.run(ToolCall("search", "cheese", 0, 0)).text == "Page 1: Mice\nMice eat cheese."
    with pytest.raises(ConfigError, match="tools.search_protocol=retriever needs tools.search_url"):
        load_config(overrides=["tools.search_protocol=retriever"])


def test_a_rollout_batches_queries_and_survives_500s_and_hangs(url):
    """The toy policy writes `<search>digits</search>`; calls of one step share a request, and a 500 or a
    timed-out request gives its queries error results while the rollout runs to its full set of leaves."""
    from arpo.engine import LLMEngine
    from arpo.rollout import RolloutConfig, TreeRollout
    from arpo.rollout.toy_policy import tool_chain_policy

    model, tok = tool_chain_policy("search", seed=0, hidden_size=64, layers=2, heads=4, kv_heads=2,
                                   intermediate_size=96, noise=5e-4, chain_kw={"eps": 1e-4, "p_eos": 0.05})
    engine = LLMEngine(model, tokenizer=tok, num_blocks=1024, block_size=8, max_model_len=512)
    # no result cache: which queries a request carries is then a function of the (seeded) rollout alone
    tools = ToolExecutor({"search": _search(url, timeout_s=1.0)}, max_workers=4, cache_size=0)
    cfg = RolloutConfig(mode="tree", leaves=4, initial=4, beam=2, max_response_tokens=320, max_tool_calls=2,
                        sync_tools=True)
    trees = TreeRollout(engine, tools, cfg).run([f"Q: {i}*{i + 1}+3=?" for i in range(6)], seed=0).trees
    tools.close()
    assert all(len(t.leaves) == 4 for t in trees)
    sent = [q for r in Retriever.requests for q in r["queries"]]
    assert max(len(r["queries"]) for r in Retriever.requests) > 1
    assert any(q.startswith("7") for q in sent) and any(q.startswith("9") for q in sent)  # both failures happened
    oks = [ok for t in trees for leaf in t.leaves for ok in leaf.metadata["tool_ok"]]
    assert any(oks) and not all(oks)
    # the policy's tokenizer has no capitals: results read "age 1: d1", "rror: search service failed ..."
    call_and_result = re.compile(r"<search>((?:(?!<search>).)*?)</search> <result>\n(.*?)\n</result>", re.S)
    pairs = [pair for t in trees for leaf in t.leaves for pair in call_and_result.findall(leaf.text)]
    assert any(": d" in r for _, r in pairs)
    assert any("500" in r for _, r in pairs) and any("timed out" in r for _, r in pairs)
    for query, result in pairs:
        if query.startswith(("7", "9")):
            assert "search service failed" in result
