"""Input readers: every input row becomes exactly one record; bad rows carry a reason; ids are stable."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def _write_jsonl(path, lines: list[bytes | str | dict]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def _records(table) -> list[dict]:
    return table.table.to_pylist()


def test_jsonl_with_a_custom_prompt_column_and_bad_rows(tmp_path):
    path = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"question": "What is 2+2?", "topic": "math"},
            "{not json",
            b'{"question": "caf\xe9"}',  # invalid UTF-8 (latin-1 byte)
            {"question": 42},
            {"question": "   "},
            {"other": "no question here"},
            "",  # blank lines are not rows
            "[1, 2]",
            {"question": "Name a colour."},
        ],
    )
    records = read_input(DataConfig(path=path, prompt_column="question"))
    rows = _records(records)
    assert [r["source_index"] for r in rows] == list(range(8))
    good = [r for r in rows if r["error"] is None]
    assert [r["prompt"] for r in good] == ["What is 2+2?", "Name a colour."]
    assert json.loads(good[0]["metadata"]) == {"topic": "math"}
    reasons = [r["error"] for r in rows if r["error"]]
    assert "in.jsonl:2: malformed JSON" in reasons[0]
    assert "in.jsonl:3: invalid UTF-8" in reasons[1]
    assert "must be a string, got int" in reasons[2]
    assert "is empty" in reasons[3]
    assert "missing column 'question'" in reasons[4]
    assert "must be an object, got list" in reasons[5]
    assert all(r["raw"] for r in rows if r["error"]), "error rows keep their raw input"
    assert records.num_errors == 6


def test_ids_are_stable_and_unique(tmp_path):
    lines = [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}]
    first = _records(read_input(DataConfig(path=_write_jsonl(tmp_path / "a.jsonl", lines))))
    again = _records(read_input(DataConfig(path=_write_jsonl(tmp_path / "b.jsonl", lines))))
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert len({r["id"] for r in first}) == 3, "equal prompts at different positions get different ids"


def test_declared_id_column_and_duplicates(tmp_path):
    path = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": "x"},
            {"id": 7, "prompt": "y"},
            {"id": "a", "prompt": "z"},
            {"prompt": "no id"},
        ],
    )
    rows = _records(read_input(DataConfig(path=path, id_column="id")))
    assert [r["id"] for r in rows[:3]] == ["a", "7", "a"]
    assert rows[0]["error"] is None and rows[1]["error"] is None
    assert rows[2]["error"] == "duplicate id 'a' (first seen at input row 0)"
    assert rows[3]["error"] == "missing id (column 'id')"


def test_chat_messages_column(tmp_path):
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user"}]},
            {"messages": json.dumps([{"role": "user", "content": "hi"}])},  # a column of JSON text
            {"messages": 5},
        ],
    )
    rows = _records(read_input(DataConfig(path=path, messages_column="messages")))
    assert rows[0]["is_chat"] and json.loads(rows[0]["prompt"]) == [{"content": "hi", "role": "user"}]
    assert "messages[0].content is null" in rows[1]["error"]
    assert rows[2]["error"].endswith(
        "messages must be a non-empty list of {role, content} objects, got a string (JSON text is not parsed: "
        "store the messages as a list of objects, or give the text in data.prompt_column)"
    )
    assert rows[3]["error"].endswith("messages must be a non-empty list of {role, content} objects")


def test_parquet_file_and_directory(tmp_path):
    table = pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "one.parquet")
    rows = _records(read_input(DataConfig(path=str(tmp_path / "one.parquet"), prompt_column="text")))
    assert [r["prompt"] for r in rows] == ["a", None, "c"]
    assert rows[1]["error"] == "prompt (column 'text') is null"
    directory = tmp_path / "parts"
    directory.mkdir()
    pq.write_table(table.slice(0, 1), directory / "part-0.parquet")
    pq.write_table(table.slice(2, 1), directory / "part-1.parquet")
    rows = _records(read_input(DataConfig(path=str(directory), prompt_column="text")))
    assert [r["prompt"] for r in rows] == ["a", "c"]


def test_binary_prompt_with_invalid_utf8(tmp_path):
    pq.write_table(
        pa.table({"prompt": pa.array([b"ok", b"\xff\xfe"], type=pa.binary())}), tmp_path / "b.parquet"
    )
    rows = _records(read_input(DataConfig(path=str(tmp_path / "b.parquet"))))
    assert rows[0]["prompt"] == "ok"
    assert "not valid UTF-8" in rows[1]["error"]


def test_saved_hugging_face_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = DatasetDict(
        {"train": Dataset.from_dict({"prompt": ["p1", "p2"]}), "test": Dataset.from_dict({"prompt": ["t1"]})}
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(InputError, match="choose one with data.split"):
        read_input(DataConfig(path=str(tmp_path / "hf")))
    rows = _records(read_input(DataConfig(path=str(tmp_path / "hf"), split="test")))
    assert [r["prompt"] for r in rows] == ["t1"]


@pytest.mark.parametrize(
    ("suffix", "make", "config", "message"),
    [
        (".jsonl", lambda p: None, {}, "does not exist"),
        (
            ".jsonl",
            lambda p: _write_jsonl(p, [{"text": "x"}]),
            {},
            "no row of .* has the prompt column 'prompt'",
        ),
        (
            ".jsonl",
            lambda p: _write_jsonl(p, [{"text": "x"}, {"prompt": "y"}]),
            {"limit": 1},
            r"no row of the first 1 of .* \(data.limit\) has the prompt column 'prompt'",
        ),
        (
            ".parquet",
            lambda p: pq.write_table(pa.table({"x": [1]}), p),
            {},
            "the input has no column 'prompt'",
        ),
        (
            ".parquet",
            lambda p: pq.write_table(pa.table({"prompt": ["x"]}), p),
            {"id_column": "uid"},
            "data.id_column='uid' is not a column",
        ),
        (".parquet", lambda p: p.write_bytes(b"PAR1garbage"), {}, "not a readable Parquet file"),
        (
            ".jsonl",
            lambda p: _write_jsonl(p, [{"prompt": "x"}]),
            {"format": "parquet"},
            "not a readable Parquet",
        ),
        (".txt", lambda p: p.write_text("x"), {}, "cannot tell the format"),
    ],
    ids=[
        "missing-file",
        "missing-column-jsonl",
        "missing-column-within-the-limit",
        "missing-column-parquet",
        "missing-id-column",
        "corrupt-parquet",
        "wrong-format",
        "unknown-suffix",
    ],
)
def test_unusable_input_fails_at_startup(tmp_path, suffix, make, config, message):
    path = tmp_path / f"input{suffix}"
    make(path)
    with pytest.raises(InputError, match=message):
        read_input(DataConfig(path=str(path), **config))


def test_fingerprint_tracks_content(tmp_path):
    a = read_input(DataConfig(path=_write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])))
    b = read_input(DataConfig(path=_write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x"}])))
    c = read_input(DataConfig(path=_write_jsonl(tmp_path / "c.jsonl", [{"prompt": "y"}])))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_shipped_prompts_are_the_documented_held_out_set():
    from pipeline.tasks.generators import expected_answer, is_held_out
    from pipeline.tasks.shipped import SHIPPED_PATH, render

    assert SHIPPED_PATH.read_text(encoding="utf-8") == render(), (
        "regenerate with python -m pipeline.tasks.shipped"
    )
    rows = _records(read_input(DataConfig()))
    assert len(rows) >= 200 and all(r["error"] is None for r in rows)
    assert all(is_held_out(r["prompt"]) and expected_answer(r["prompt"]) for r in rows)


def test_records_built_in_batches_equal_one_batch(tmp_path, monkeypatch):
    """The builder turns every BATCH_ROWS records into an Arrow batch: the records, the fingerprint and the
    duplicate-id check across batches are those of a single batch."""
    from pipeline.data import records as records_module

    lines = [{"id": f"r{i % 7}", "prompt": f"Add: {i}+1", "k": i} for i in range(10)] + ["{bad", {"id": "r9"}]
    path = _write_jsonl(tmp_path / "in.jsonl", lines)
    whole = read_input(DataConfig(path=path, id_column="id"))
    monkeypatch.setattr(records_module, "BATCH_ROWS", 3)
    batched = read_input(DataConfig(path=path, id_column="id"))
    assert len(batched.table.column("id").chunks) == 4 and len(whole.table.column("id").chunks) == 1
    assert _records(batched) == _records(whole) and batched.fingerprint == whole.fingerprint
    duplicates = [
        r["source_index"] for r in _records(batched) if (r["error"] or "").startswith("duplicate id")
    ]
    assert duplicates == [7, 8, 9]


def test_ids_that_are_blank_or_booleans_are_error_rows_naming_the_column(tmp_path):
    path = _write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "  ", "prompt": "x"}, {"id": True, "prompt": "y"}, {"id": 1, "prompt": "z"}],
    )
    rows = _records(read_input(DataConfig(path=path, id_column="id")))
    assert rows[0]["error"] == "empty id (column 'id')", "a whitespace id names no row"
    assert rows[1]["error"] == "id in column 'id' must be a string or an integer, got bool"
    assert rows[2]["error"] is None and rows[2]["id"] == "1", "an integer id is its text"


def test_an_error_rows_raw_input_is_truncated(tmp_path):
    from pipeline.data.records import RAW_LIMIT

    broken = "{" + "x" * (3 * RAW_LIMIT)  # malformed JSON, longer than an error row keeps
    rows = _records(
        read_input(DataConfig(path=_write_jsonl(tmp_path / "in.jsonl", [broken, {"prompt": "ok"}])))
    )
    assert "malformed JSON" in rows[0]["error"]
    assert rows[0]["raw"] == broken[:RAW_LIMIT], "the first RAW_LIMIT characters of the line"


def test_fingerprint_tracks_the_columns_carried_as_metadata(tmp_path):
    """The other columns of a row go to the output's `metadata`: an input changed only there is another input
    (a resume over it would mix rows of both in one run)."""
    a = read_input(DataConfig(path=_write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "label": 1}])))
    b = read_input(DataConfig(path=_write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "label": 2}])))
    assert a.fingerprint != b.fingerprint


def test_a_second_read_that_meets_more_rows_than_the_first_says_the_input_changed(tmp_path):
    """Repeated ids make the reader read the input again; a row that the first read did not see (the file grew
    in between) is InputChangedError, which read_input reports as a changed input, not an IndexError."""
    from array import array

    from pipeline.data.records import InputChangedError, RecordBuilder

    data = DataConfig(path="unused", id_column="id")
    first = RecordBuilder(data)
    for index, rid in enumerate(["a", "a"]):
        first.add(index, {"id": rid, "prompt": "p"}, None, None)
    assert first.repeated_ids(first.finish()) == frozenset({"a"})
    second = RecordBuilder(data, repeated=frozenset({"a"}), first_read=array("q", first.id_hashes))
    try:
        for index, rid in enumerate(["a", "a"]):
            second.add(index, {"id": rid, "prompt": "p"}, None, None)
        with pytest.raises(
            InputChangedError, match="row 2 has another id than when the input was first read"
        ):
            second.add(2, {"id": "b", "prompt": "p"}, None, None)
    finally:
        second.discard()
