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
    ('{"prompt": "p"}', "missing field answer"),
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


# ---------------------------------------------------------------------------------------------------- verl rows
def _verl_row(i: int, truth) -> dict:
    """A row as the ARPO reference's (verl-format) parquet files hold it."""
    return {"data_source": "hotpotqa", "ability": "qa",
            "prompt": [{"role": "system", "content": "Answer with tools."}, {"role": "user", "content": f"q{i}?"}],
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": "train", "index": i}}


def test_verl_rows_load_as_they_are_from_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "train.parquet"
    rows = [_verl_row(0, "Paris"), _verl_row(1, "42")]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    got = load_rows(str(path), DataConfig())
    assert [r["answer"] for r in got] == ["Paris", "42"]
    assert got[1]["prompt"] == rows[1]["prompt"] and got[1]["data_source"] == "hotpotqa"
    assert got[1]["extra_info"] == {"split": "train", "index": 1} and got[1]["ability"] == "qa"


def test_verl_search_ground_truth_gives_its_targets(tmp_path):
    path = tmp_path / "search.jsonl"
    write_jsonl([_verl_row(0, {"target": ["Paris", "paris, france"]})], str(path))
    assert load_rows(str(path), DataConfig())[0]["answer"] == ["Paris", "paris, france"]


def test_dotted_key_paths_name_nested_fields(tmp_path):
    path = tmp_path / "nested.jsonl"
    write_jsonl([{"q": {"text": "1+1?"}, "meta": {"truth": 2, "source": "math"}}], str(path))
    cfg = DataConfig(prompt_key="q.text", answer_key="meta.truth", data_source_key="meta.source")
    row = load_rows(str(path), cfg)[0]
    assert (row["prompt"], row["answer"], row["data_source"]) == ("1+1?", "2", "math")


def test_a_literal_dotted_key_wins_over_the_path(tmp_path):
    path = tmp_path / "literal.jsonl"
    write_jsonl([{"prompt": "p", "a.b": "literal", "a": {"b": "nested"}}], str(path))
    assert load_rows(str(path), DataConfig(answer_key="a.b"))[0]["answer"] == "literal"


def test_a_configured_answer_key_does_not_fall_back_to_verl(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl([_verl_row(0, "Paris")], str(path))
    with pytest.raises(DataError, match=r"rows.jsonl, row 1: missing field gold"):
        load_rows(str(path), DataConfig(answer_key="gold"))


@pytest.mark.parametrize("row,message", [
    ({"data_source": "x", "prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}},
     "missing field answer or reward_model.ground_truth"),
    ({"data_source": "x", "reward_model": {"ground_truth": "a"}}, "missing field prompt"),
    ({"data_source": "x", "prompt": [{"role": "user"}], "reward_model": {"ground_truth": "a"}},
     "chat message 0 must be"),
    ({"data_source": "x", "prompt": "q", "reward_model": {"ground_truth": None}}, "'answer' must be"),
])
def test_malformed_verl_row_names_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl([_verl_row(0, "a"), _verl_row(1, "b"), row], str(path))
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig())
    assert "bad.jsonl, row 3" in str(err.value) and message in str(err.value)


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([_verl_row(0, "a"), _verl_row(1, None)]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"bad.parquet, row 2: 'answer' must be"):
        load_rows(str(path), DataConfig())
