"""The `search` tool over a local JSONL corpus (BM25); `http_search.HttpSearch` is the same tool over a service.

The reference called a remote retriever; for reproducible training and tests we index a local corpus of
`{"id", "title", "text"}` lines with bm25s. The index is built once per corpus content and cached on disk under a
key derived from the corpus hash, so a changed corpus never reads a stale index. Results are formatted like the
reference: `Page 1: title\\ntext` per hit, each passage and the whole answer length-capped.

`run` never raises: failures become an error ToolResult.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time

from arpo.jsonl import read_jsonl
from arpo.tools.base import BaseTool, ToolResult, truncate

_WORD = re.compile(r"[a-z0-9]+")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "arpo", "bm25")


def tokenize(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Lower-cased alphanumeric words minus stopwords; used for both documents and queries."""
    return [w for w in _WORD.findall(text.lower()) if w not in stopwords]


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def load_corpus(path: str) -> list[dict]:
    """Read a JSONL corpus; each line needs string fields `title` and `text` (`id` optional)."""
    docs = []
    for lineno, doc in read_jsonl(path):
        if not isinstance(doc, dict) or not isinstance(doc.get("title"), str) or not isinstance(doc.get("text"), str):
            raise ValueError(f"{path}, row {lineno}: a corpus line needs string fields 'title' and 'text'")
        docs.append({"id": str(doc.get("id", lineno)), "title": doc["title"], "text": doc["text"]})
    if not docs:
        raise ValueError(f"{path}: the corpus is empty")
    return docs


def format_hits(hits: list[dict], max_passage_chars: int) -> str:
    """`Page i: title\\ntext` for each hit, in rank order."""
    return "\n".join(f"Page {i}: {h['title']}\n{truncate(h['text'], max_passage_chars)}"
                     for i, h in enumerate(hits, 1))


class LocalSearch(BaseTool):
    """BM25 search over a JSONL corpus: `LocalSearch("corpus.jsonl", top_k=3).run("query") -> ToolResult`."""

    name = tag = "search"
    description = "Search a text corpus and return the most relevant passages."
    argument, argument_description = "query", "the search query"

    def __init__(self, corpus_path: str, top_k: int = 3, max_passage_chars: int = 600,
                 max_result_chars: int = 3000, cache_dir: str | None = DEFAULT_CACHE):
        if top_k < 1:
            raise ValueError(f"LocalSearch: top_k must be >= 1, got {top_k}")
        self.corpus_path, self.top_k = corpus_path, top_k
        self.max_passage_chars, self.max_result_chars = max_passage_chars, max_result_chars
        self.docs = load_corpus(corpus_path)
        self._stop = _stopwords()
        with open(corpus_path, "rb") as f:
            self.corpus_hash = hashlib.sha256(f.read()).hexdigest()[:16]
        self.index_dir = os.path.join(cache_dir, self.corpus_hash) if cache_dir else None
        self.retriever, self.loaded_from_cache = self._load_or_build()
        self._lock = threading.Lock()  # bm25s retrieval is not documented as thread-safe

    def _load_or_build(self):
        import bm25s

        if self.index_dir and os.path.isfile(os.path.join(self.index_dir, "params.index.json")):
            try:
                return bm25s.BM25.load(self.index_dir), True
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
                pass
        retriever = bm25s.BM25()
        tokens = [tokenize(f"{d['title']} {d['text']}", self._stop) or ["<empty>"] for d in self.docs]
        retriever.index(tokens, show_progress=False)
        if self.index_dir:
            tmp = f"{self.index_dir}.tmp{os.getpid()}.{threading.get_ident()}"
            retriever.save(tmp)
            try:
                os.replace(tmp, self.index_dir)
            except OSError:  # another process won the race; its index is identical
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return retriever, False

    def search(self, query: str, top_k: int | None = None) -> list[dict]:
        """Ranked hits (dicts with id, title, text, score); words absent from the corpus are ignored."""
        k = min(top_k or self.top_k, len(self.docs))
        words = [w for w in tokenize(query, self._stop) if w in self.retriever.vocab_dict]
        if not words:
            return []
        with self._lock:
            ids, scores = self.retriever.retrieve([words], k=k, show_progress=False, n_threads=1)
        return [dict(self.docs[int(i)], score=float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def run(self, text: str) -> ToolResult:
        start = time.perf_counter()
        query = text.strip()
        try:
            if not query:
                return ToolResult.failure("Error: empty search query", time.perf_counter() - start)
            hits = self.search(query)
            body = format_hits(hits, self.max_passage_chars) if hits else "No results found."
            return ToolResult(truncate(body, self.max_result_chars), True, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            return ToolResult.failure(f"Error: search failed: {type(exc).__name__}: {exc}",
                                      time.perf_counter() - start)
