"""A JSON object with a key twice is ambiguous: json.loads kept the last value silently, so `{"prompt": "a",
"prompt": "b"}` generated from "b". Such a line is that row's error naming the key(s) and the line; a Parquet
file with a column twice (pyarrow's to_pylist keeps the last) fails at start-up naming it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def _rows(tmp_path, text: str, **config) -> list[dict]:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    return read_input(DataConfig(path=str(path), **config)).table.to_pylist()


def test_a_jsonl_line_with_a_duplicate_key_is_that_rows_error(tmp_path):
    rows = _rows(
        tmp_path,
        '{"prompt": "Add: 1+2", "k": 1}\n'
        '{"prompt": "a", "prompt": "b", "k": 2, "k": 3}\n'
        '{"prompt": "Add: 3+4", "k": 4}\n',
    )
    assert [r["prompt"] for r in rows] == ["Add: 1+2", None, "Add: 3+4"]
    error = rows[1]["error"]
    assert error.startswith("in.jsonl:2: duplicate key(s) 'prompt', 'k' in one JSON object")
    assert "keep one value per key" in error
    assert rows[1]["raw"] == '{"prompt": "a", "prompt": "b", "k": 2, "k": 3}'


def test_a_duplicate_key_in_a_nested_object_is_that_rows_error(tmp_path):
    rows = _rows(
        tmp_path,
        '{"messages": [{"role": "user", "content": "hi", "content": "bye"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        messages_column="messages",
    )
    assert "in.jsonl:1: duplicate key(s) 'content'" in rows[0]["error"]
    assert rows[1]["error"] is None


@pytest.mark.parametrize("lines", [1, 3])
def test_a_file_whose_every_line_has_a_duplicate_key_is_still_json_lines(tmp_path, lines):
    """Its lines are objects: error rows, not 'not JSON Lines: none of its lines is a JSON object'."""
    rows = _rows(tmp_path, '{"prompt": "a", "prompt": "b"}\n' * lines)
    assert [r["error"].split(": ", 1)[1][:16] for r in rows] == ["duplicate key(s)"] * lines


def test_a_parquet_file_with_a_column_twice_fails_at_startup_naming_it(tmp_path):
    table = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array(["b"]), pa.array([1])], names=["prompt", "prompt", "k"]
    )
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet has the column\(s\) 'prompt' more than once"):
        read_input(DataConfig(path=str(tmp_path / "in.parquet")))
