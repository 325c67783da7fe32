"""A `data.id_column` that no row of the input has is a configuration mistake (a typo, the wrong input):
it fails at start-up naming the column, for JSON Lines as it already did for Parquet and saved datasets,
instead of running a job whose every row becomes an error row and exiting 0."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def _jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_id_column_that_no_row_has_fails_at_startup_naming_it(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Add: 1+2", "uid": "a"}, {"prompt": "Add: 3+4", "uid": "b"}]
    )
    with pytest.raises(InputError, match=r"data\.id_column='idx'.*columns seen: prompt, uid"):
        read_input(DataConfig(path=path, id_column="idx"))


def test_parquet_id_column_that_no_row_has_fails_at_startup_too(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["Add: 1+2"], "uid": ["a"]}), path)
    with pytest.raises(InputError, match=r"data\.id_column='idx'"):
        read_input(DataConfig(path=str(path), id_column="idx"))


def test_jsonl_id_column_missing_on_some_rows_makes_only_those_error_rows(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Add: 1+2", "uid": "a"}, {"prompt": "Add: 3+4"}])
    rows = read_input(DataConfig(path=path, id_column="uid")).table.to_pylist()
    assert [r["id"] for r in rows][0] == "a" and rows[0]["error"] is None
    assert rows[1]["error"] == "missing id (column 'uid')"


def test_unparseable_jsonl_lines_are_still_error_rows_with_an_id_column(tmp_path):
    """Lines that do not parse cannot show which columns exist: they stay error rows, not a start-up failure."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Add: 1+2", "uid": "a"}\n{broken\n')
    rows = read_input(DataConfig(path=str(path), id_column="uid")).table.to_pylist()
    assert rows[0]["error"] is None and "malformed JSON" in rows[1]["error"]


def test_parquet_rows_that_all_fail_to_decode_are_error_rows_with_an_id_column(tmp_path):
    """No row decodes, so none shows its columns: the id column (in the file's schema) is not called missing;
    every row is an error row naming the bad value."""
    from tests.data.test_reader_fixes import _string_array_with_invalid_utf8

    prompts = _string_array_with_invalid_utf8([b"Add: \xff", b"Add: \xfe"])
    pq.write_table(pa.table({"prompt": prompts, "uid": ["a", "b"]}), tmp_path / "p.parquet")
    rows = read_input(DataConfig(path=str(tmp_path / "p.parquet"), id_column="uid")).table.to_pylist()
    assert [r["source_index"] for r in rows] == [0, 1]
    assert all("column 'prompt' is not valid UTF-8" in r["error"] for r in rows), rows


def test_a_decimal_id_column_of_integers_gives_their_integer_ids(tmp_path):
    """SQL NUMBER(38, 0) columns (Snowflake's integers) are Parquet decimals: every row was an error row, "id in
    column 'uid' must be a string or an integer, got Decimal". A decimal with a fraction is still refused."""
    from decimal import Decimal

    uids = [Decimal(12345678901234567890123), Decimal(7), None]
    fractions = [Decimal("1.00"), Decimal("1.50"), Decimal("2.00")]
    pq.write_table(
        pa.table(
            {
                "prompt": ["Add: 1+2", "Add: 3+4", "Add: 5+6"],
                "uid": pa.array(uids, pa.decimal128(38, 0)),
                "frac": pa.array(fractions, pa.decimal128(5, 2)),
            }
        ),
        tmp_path / "p.parquet",
    )
    rows = read_input(DataConfig(path=str(tmp_path / "p.parquet"), id_column="uid")).table.to_pylist()
    assert [(r["id"], r["error"]) for r in rows[:2]] == [("12345678901234567890123", None), ("7", None)]
    assert rows[2]["error"] == "missing id (column 'uid')"
    rows = read_input(DataConfig(path=str(tmp_path / "p.parquet"), id_column="frac")).table.to_pylist()
    assert [r["id"] for r in rows if r["error"] is None] == ["1", "2"]
    assert rows[1]["error"] == "id in column 'frac' must be a string or an integer, got Decimal"


UUID_TEXT = "8eef64db-74df-4216-ade0-ae1d9c62f045"


def test_a_uuid_id_column_gives_the_canonical_text_a_jsonl_string_of_it_gives(tmp_path):
    """A Parquet UUID column (pyarrow's pa.uuid(), Parquet's UUID type as DuckDB writes it) made every row an
    error row, "id in column 'uid' must be a string or an integer, got UUID". Its ids are now the UUIDs'
    canonical text, and the records (and fingerprint) are those of a JSONL input with that text as the id."""
    import uuid

    if not hasattr(pa, "uuid"):
        pytest.skip("pyarrow before 18 has no UUID type")
    uids = pa.array([uuid.UUID(UUID_TEXT).bytes, None], pa.uuid())
    pq.write_table(pa.table({"prompt": ["Add: 1+2", "Add: 3+4"], "uid": uids}), tmp_path / "p.parquet")
    parquet = read_input(DataConfig(path=str(tmp_path / "p.parquet"), id_column="uid"))
    rows = parquet.table.to_pylist()
    assert [(r["id"], r["error"]) for r in rows] == [
        (UUID_TEXT, None),
        (rows[1]["id"], "missing id (column 'uid')"),
    ]
    jsonl = read_input(
        DataConfig(
            path=_jsonl(tmp_path / "p.jsonl", [{"prompt": "Add: 1+2", "uid": UUID_TEXT}]), id_column="uid"
        )
    )
    assert jsonl.table.to_pylist()[0] == rows[0]
    pq.write_table(pa.table({"prompt": ["Add: 1+2"], "uid": uids[:1]}), tmp_path / "one.parquet")
    assert read_input(DataConfig(path=str(tmp_path / "one.parquet"), id_column="uid")).fingerprint == (
        jsonl.fingerprint
    )
    from pipeline.llm import _id_list

    assert _id_list([uuid.UUID(UUID_TEXT), 7], 2) == [UUID_TEXT, "7"]  # the Python API's ids=[...]


def test_a_uuid_column_read_as_16_bytes_gives_the_same_ids(tmp_path, monkeypatch):
    """pyarrow before 18 reads a Parquet UUID column as fixed_size_binary(16): its ids (and its text in
    metadata) are the same canonical text. 16 bytes the file does not type as UUID stay an error row, saying
    how to write them."""
    import functools
    import uuid

    if not hasattr(pa, "uuid"):
        pytest.skip("pyarrow before 18 cannot write a UUID column")
    raw = uuid.UUID(UUID_TEXT).bytes
    table = pa.table(
        {"prompt": ["Add: 1+2"], "uid": pa.array([raw], pa.uuid()), "b16": pa.array([raw], pa.binary(16))}
    )
    pq.write_table(table, tmp_path / "p.parquet", store_schema=False)
    monkeypatch.setattr(pq, "ParquetFile", functools.partial(pq.ParquetFile, arrow_extensions_enabled=False))
    assert pq.ParquetFile(tmp_path / "p.parquet").schema_arrow.field("uid").type == pa.binary(16)
    data = DataConfig(path=str(tmp_path / "p.parquet"), id_column="uid", metadata_columns=[])
    assert read_input(data).table.to_pylist()[0]["id"] == UUID_TEXT
    data = DataConfig(path=str(tmp_path / "p.parquet"), id_column="b16", metadata_columns=["uid"])
    row = read_input(data).table.to_pylist()[0]
    assert row["error"].startswith("id in column 'b16' must be a string or an integer, got bytes (a binary")
    assert "pa.uuid()" in row["error"]
    data = DataConfig(path=str(tmp_path / "p.parquet"), metadata_columns=["uid"])
    assert json.loads(read_input(data).table.to_pylist()[0]["metadata"]) == {"uid": UUID_TEXT}


def test_string_and_integer_ids_are_kept_as_they_were(tmp_path):
    """Ids that worked before the UUID ids keep their text: a string that spells a UUID in capitals is not
    rewritten (ids are the user's), an integer is its digits."""
    upper = UUID_TEXT.upper()
    path = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Add: 1+2", "uid": upper}, {"prompt": "Add: 3+4", "uid": 7}]
    )
    rows = read_input(DataConfig(path=path, id_column="uid")).table.to_pylist()
    assert [(r["id"], r["error"]) for r in rows] == [(upper, None), ("7", None)]
