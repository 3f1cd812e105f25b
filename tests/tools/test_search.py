"""Local BM25 search over the bundled corpus, its on-disk cache, and the HTTP backend."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from arpo.data import world
from arpo.tools import HttpSearch, LocalSearch, load_tool
from arpo.tools.search import tokenize


@pytest.fixture
def search(tmp_path):
    return LocalSearch(world.CORPUS_PATH, top_k=3, cache_dir=str(tmp_path / "idx"))


def _naive_rank(query, docs):
    """Peer check: the best document should at least contain the most query words."""
    words = set(tokenize(query))
    return max(len(words & set(tokenize(d["title"] + " " + d["text"]))) for d in docs)


@pytest.mark.parametrize("i", range(0, 25, 6))
def test_title_queries_find_their_passage(search, i):
    for doc in (world.town_passage(i), world.person_passage(i)):
        hits = search.search(doc["title"])
        assert hits[0]["title"] == doc["title"]
        assert len(set(tokenize(doc["title"])) & set(tokenize(hits[0]["text"]))) == _naive_rank(
            doc["title"], search.docs)


def test_result_format_and_caps(tmp_path):
    s = LocalSearch(world.CORPUS_PATH, top_k=2, max_passage_chars=60, max_result_chars=150,
                    cache_dir=str(tmp_path))
    res = s.run("bramwick glass")
    assert res.ok and res.text.startswith("Page 1: bramwick\n") and len(res.text) <= 150
    assert s.run("zzzz qqqq").text == "No results found."
    assert not s.run("   ").ok


def test_index_is_cached_on_disk_by_corpus_hash(tmp_path):
    cache = str(tmp_path / "cache")
    first = LocalSearch(world.CORPUS_PATH, cache_dir=cache)
    second = LocalSearch(world.CORPUS_PATH, cache_dir=cache)
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert second.search("ostrel")[0]["title"] == first.search("ostrel")[0]["title"] == "ostrel"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "1", "title": "zebra", "text": "a striped horse"}) + "\n")
    third = LocalSearch(str(other), cache_dir=cache)
    assert third.corpus_hash != first.corpus_hash and not third.loaded_from_cache
    assert third.search("striped")[0]["title"] == "zebra"


def test_malformed_corpus_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{"title": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2"):
        LocalSearch(str(bad), cache_dir=None)


def test_builtin_search_uses_bundled_corpus():
    """The run builder gives `search` the embedded world's corpus when the config names none; the registry itself
    (below the data layer) asks for one."""
    from arpo.build import build_tools
    from arpo.config import Config

    cfg = Config()
    cfg.tools.enabled = ["search"]
    tools = build_tools(cfg)
    try:
        assert tools.tools["search"].run("hadrun").text.startswith("Page 1: hadrun")
    finally:
        tools.close()
    assert load_tool("search", corpus_path=world.CORPUS_PATH, cache_dir=None).run("hadrun").text.startswith(
        "Page 1: hadrun")
    with pytest.raises(ValueError, match="corpus_path"):
        load_tool("search")


class _Handler(BaseHTTPRequestHandler):
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"results": [{"title": "T", "text": f"about {body['query']}"}] * body["top_k"]})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/search"
    srv.shutdown()


def test_http_search_with_retries(server):
    _Handler.fail_first = 1
    res = HttpSearch(server, top_k=2, retries=1, backoff_s=0.01).run("cats")
    assert res.ok and res.text == "Page 1: T\nabout cats\nPage 2: T\nabout cats"
    _Handler.fail_first = 5
    res = HttpSearch(server, retries=1, backoff_s=0.01).run("cats")
    assert not res.ok and "after 2 attempts" in res.text


def test_http_search_unreachable_is_an_error_result():
    res = HttpSearch("http://127.0.0.1:9/none", timeout_s=0.5, retries=0).run("x")
    assert not res.ok and res.error
    with pytest.raises(ValueError, match="http"):
        HttpSearch("ftp://x")
