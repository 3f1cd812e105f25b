"""Load a training/eval set from JSONL: one `{"prompt", "answer", "data_source"}` object per line.

Rows are validated before `datasets` sees them, so a malformed line fails with the file and line number instead
of an Arrow schema error three layers down. `answer` may be a string or a list of acceptable strings (it is
stored as a list); extra fields are kept (rewards receive them as `**row`).
"""
from __future__ import annotations

import json

REQUIRED = ("prompt", "answer", "data_source")


def _check_row(row, path: str, lineno: int) -> dict:
    where = f"{path}, row {lineno}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need {', '.join(REQUIRED)})")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(row["data_source"], str):
        raise ValueError(f"{where}: 'data_source' must be a string")
    answer = row["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, str):
        answer = [answer]
    if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
        raise ValueError(f"{where}: 'answer' must be a string, a number or a non-empty list of strings")
    return dict(row, answer=answer)


def read_jsonl_rows(path: str) -> list[dict]:
    """Validated rows of a JSONL file (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, row {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            rows.append(_check_row(row, path, lineno))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_jsonl_dataset(path: str):
    """A `datasets.Dataset` of the validated rows."""
    import datasets

    return datasets.Dataset.from_list(read_jsonl_rows(path))


def write_jsonl(rows, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
