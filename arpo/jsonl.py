"""The one JSONL reader: every file of rows (prompts, SFT traces, search corpora) is read here, so that a bad line
fails the same way everywhere — with the file and the line number. What a row must hold is checked by the one
validator of its kind, next to the code that uses it (`trainer/data.py` prompt rows, `trainer/sft.py` traces,
`tools/search.py` corpus documents)."""
from __future__ import annotations

import json
from typing import Any, Iterable


def read_jsonl(path: str, error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; `error` (naming file and line) for invalid JSON."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise error(f"{path}, row {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    return out


def write_jsonl(rows: Iterable, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


__all__ = ["read_jsonl", "write_jsonl"]
