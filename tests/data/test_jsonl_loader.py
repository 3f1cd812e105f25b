"""JSONL dataset loading with row-level errors."""
import json

import pytest

from arpo.data import load_jsonl_dataset, read_jsonl_rows, write_jsonl


def test_loads_rows_into_a_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "Q: 1+1=?", "answer": "2", "data_source": "math", "level": 1},
            {"prompt": "who?", "answer": ["a", "b"], "data_source": "nq", "level": 2},
            {"prompt": "n?", "answer": 3, "data_source": "gsm8k", "level": 3}]
    write_jsonl(rows, str(path))
    ds = load_jsonl_dataset(str(path))
    assert len(ds) == 3 and ds[0]["answer"] == ["2"] and ds[1]["answer"] == ["a", "b"] and ds[2]["answer"] == ["3"]
    assert ds["level"] == [1, 2, 3]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "answer": "a"}', "missing field(s) data_source"),
    ('{"prompt": "p", "answer": "a", "data_source": "x"', "invalid JSON"),
    ('["p", "a"]', "expected a JSON object"),
    ('{"prompt": "", "answer": "a", "data_source": "x"}', "'prompt' must be"),
    ('{"prompt": "p", "answer": [], "data_source": "x"}', "'answer' must be"),
    ('{"prompt": "p", "answer": "a", "data_source": 5}', "'data_source' must be"),
])
def test_malformed_row_names_file_and_row(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "answer": "a", "data_source": "x"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError) as err:
        read_jsonl_rows(str(path))
    assert "bad.jsonl, row 3" in str(err.value) and message in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl_rows(str(path))
