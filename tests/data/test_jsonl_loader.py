"""The one JSONL reader (`arpo.jsonl`) and the one prompt-row validator (`arpo.trainer.data.load_rows`):
row-level errors that name the file and the line."""
import json

import pytest

from arpo.config import DataConfig
from arpo.jsonl import read_jsonl, write_jsonl
from arpo.trainer.data import DataError, load_rows


def test_loads_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "Q: 1+1=?", "answer": "2", "data_source": "math", "level": 1},
            {"prompt": "who?", "answer": ["a", "b"], "data_source": "nq", "level": 2},
            {"prompt": "n?", "answer": 3, "data_source": "gsm8k", "level": 3}]
    write_jsonl(rows, str(path))
    got = load_rows(str(path), DataConfig())
    assert [r["answer"] for r in got] == ["2", ["a", "b"], "3"]
    assert [r["level"] for r in got] == [1, 2, 3]
    assert [n for n, _ in read_jsonl(str(path))] == [1, 2, 3]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p"}', "missing field(s) answer"),
    ('{"prompt": "p", "answer": "a", "data_source": "x"', "invalid JSON"),
    ('["p", "a"]', "expected an object"),
    ('{"prompt": "", "answer": "a", "data_source": "x"}', "the prompt is empty"),
    ('{"prompt": "p", "answer": [], "data_source": "x"}', "'answer' must be"),
    ('{"prompt": "p", "answer": "a", "data_source": 5}', "'data_source' must be"),
])
def test_malformed_row_names_file_and_row(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "answer": "a", "data_source": "x"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig())
    assert "bad.jsonl, row 3" in str(err.value) and message in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(path), DataConfig())
