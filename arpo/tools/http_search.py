"""The `search` tool through an HTTP service, in our own protocol or the community's retrieval-server protocol.

`protocol="arpo"` posts `{"query", "top_k"}` to `url`, one query a request, and accepts `[{"title", "text"}...]`
or `{"results": [...]}`.

`protocol="retriever"` speaks the retrieval server that search-agent RL runs (Search-R1's `retrieval_server.py`,
reused by verl's search tool and its successors): `url` is its `/retrieve` endpoint, the request
`{"queries": [...], "topk": k, "return_scores": true}`, the answer `{"result": [[{"document": {"contents":
"title\\ntext"}, "score": s}, ...], ...]}`, one hit list a query in order (a bare document without a score is
accepted too). Titles lose the double quotes the wiki-18 corpus wraps them in. Several queries go in one request:
the tool is `batchable`, so the executor hands it the calls of a rollout step together (`run_batch`), and
repeated queries are sent once. How to start such a server next to a run: README, "Search through a retrieval
server".

Nothing raises from `run` or `run_batch`: an HTTP error, a timeout (`timeout_s` per socket operation), an
unreachable server or an answer of the wrong shape becomes an error ToolResult for every query of that request,
after `retries` further attempts with exponential backoff; a malformed hit list fails only its own query.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.request

from arpo.tools.base import BaseTool, ToolResult, truncate
from arpo.tools.search import format_hits

PROTOCOLS = ("arpo", "retriever")


class HttpSearch(BaseTool):
    """Search through a service: `HttpSearch(url, protocol="retriever").run("query") -> ToolResult`."""

    name = tag = "search"
    description = "Search a text corpus and return the most relevant passages."
    argument, argument_description = "query", "the search query"

    def __init__(self, url: str, top_k: int = 3, timeout_s: float = 10.0, retries: int = 2,
                 backoff_s: float = 0.5, max_passage_chars: int = 600, max_result_chars: int = 3000,
                 protocol: str = "arpo", max_batch: int = 64):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpSearch: url must start with http:// or https://, got {url!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"HttpSearch: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if top_k < 1 or max_batch < 1:
            raise ValueError(f"HttpSearch: top_k and max_batch must be >= 1, got {top_k} and {max_batch}")
        self.url, self.top_k, self.timeout_s, self.retries, self.backoff_s = url, top_k, timeout_s, retries, backoff_s
        self.max_passage_chars, self.max_result_chars = max_passage_chars, max_result_chars
        self.protocol = protocol
        self.batchable = protocol == "retriever"
        self.max_batch = max_batch if self.batchable else 1  # queries per request

    def run(self, text: str) -> ToolResult:
        return self.run_batch([text])[0]

    def run_batch(self, texts: list[str]) -> list[ToolResult]:
        """One result per text, in order; distinct queries go `max_batch` to a request."""
        start = time.perf_counter()
        results: list[ToolResult | None] = [None] * len(texts)
        where: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            query = text.strip()
            if query:
                where.setdefault(query, []).append(i)
            else:
                results[i] = ToolResult.failure("Error: empty search query")
        queries = list(where)
        for a in range(0, len(queries), self.max_batch):
            chunk = queries[a:a + self.max_batch]
            for query, hits in zip(chunk, self._fetch(chunk)):
                result = self._result(hits, time.perf_counter() - start)
                for i in where[query]:
                    results[i] = result
        return results

    def _result(self, hits: list[dict] | str, latency_s: float) -> ToolResult:
        if isinstance(hits, str):
            return ToolResult.failure(f"Error: {hits}", latency_s)
        body = format_hits(hits, self.max_passage_chars) if hits else "No results found."
        return ToolResult(truncate(body, self.max_result_chars), True, latency_s)

    def _fetch(self, queries: list[str]) -> list[list[dict] | str]:
        """Each query's hits, or an error message for it; the request is retried on any failure."""
        error = ""
        for attempt in range(self.retries + 1):
            try:
                if self.protocol == "arpo":
                    return [arpo_hits(self._post({"query": queries[0], "top_k": self.top_k}), self.top_k)]
                body = {"queries": queries, "topk": self.top_k, "return_scores": True}
                return retriever_hits(self._post(body), len(queries), self.top_k)
            except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, bad JSON
                error = f"{type(exc).__name__}: {exc}"
                if attempt < self.retries:
                    time.sleep(self.backoff_s * (2 ** attempt))
        return [f"search service failed after {self.retries + 1} attempts: {error}"] * len(queries)

    def _post(self, body: dict):
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))


def arpo_hits(data, top_k: int) -> list[dict]:
    """`[{"title", "text"}...]` or `{"results": [...]}` -> hits; ValueError on any other shape."""
    hits = data.get("results") if isinstance(data, dict) else data
    if not isinstance(hits, list) or not all(isinstance(h, dict) and "text" in h for h in hits):
        raise ValueError("the response is not a list of {title, text} objects")
    return [{"title": str(h.get("title", "")), "text": str(h["text"])} for h in hits[:top_k]]


def retriever_hits(data, n_queries: int, top_k: int) -> list[list[dict] | str]:
    """A retrieval server's answer -> per query its hits, or an error message when its hit list is malformed.

    ValueError when the answer as a whole is not `{"result": [one list per query]}`."""
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        got = f"{len(result)} lists" if isinstance(result, list) else type(result).__name__
        raise ValueError(f"the response is not {{'result': [...]}} with {n_queries} hit list(s) (got {got})")
    return [_hit_list(hits, top_k) for hits in result]


def _hit_list(hits, top_k: int) -> list[dict] | str:
    if not isinstance(hits, list):
        return f"malformed search response: a hit list is a {type(hits).__name__}"
    out = []
    for h in hits[:top_k]:
        doc = h.get("document", h) if isinstance(h, dict) else None
        contents = doc.get("contents") if isinstance(doc, dict) else None
        if not isinstance(contents, str):
            return "malformed search response: a hit lacks document.contents text"
        title, _, text = contents.partition("\n")
        out.append({"title": title.strip().strip('"'), "text": text})
    return out
