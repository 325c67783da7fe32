"""A prompt column whose type holds no text (a label, a score, a list) is refused at start-up naming the
columns that do hold text: before, every row was rejected one by one ("prompt (column 'label') must be a
string, got int"), and a wrong data.prompt_column became a run of error rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        ([0, 1], "a column of type int64"),
        ([0.5, 1.0], "a column of type double"),
        ([["a"], ["b"]], "a column of type list"),
    ],
    ids=["int", "float", "list"],
)
def test_a_parquet_prompt_column_of_another_type_is_refused(tmp_path, values, shown):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["hello", "world"], "label": values, "n": [1, 2]}), path)
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(path), prompt_column="label"))
    message = str(error.value)
    assert message.startswith(f"data.prompt_column='label' is {shown}"), message
    assert "in.parquet, not text, so every row would be rejected. Columns holding text: 'text'." in message


def test_a_class_label_column_is_named_as_one_with_its_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"review": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"review": ["good", "bad"], "label": [1, 0]}, features=features).save_to_disk(
        str(tmp_path / "saved")
    )
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(tmp_path / "saved"), prompt_column="label"))
    assert str(error.value).startswith(
        "data.prompt_column='label' is a class-label column (integers standing for 'neg', 'pos'), not text"
    ), error.value
    assert "Columns holding text: 'review'." in str(error.value)


def test_text_in_other_arrow_types_is_still_read(tmp_path):
    """Dictionary-encoded text (pandas categoricals), bytes and large strings are prompts; an all-null column
    (Arrow type null) is no type error: its rows are rejected one by one as null."""
    table = pa.table(
        {
            "dict": pa.array(["a", "b"]).dictionary_encode(),
            "bytes": pa.array([b"a", b"b"]),
            "large": pa.array(["a", "b"], pa.large_string()),
            "nothing": pa.nulls(2),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    for column in ("dict", "bytes", "large"):
        records = read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column=column))
        assert records.table.column("prompt").to_pylist() == ["a", "b"], column
    records = read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column="nothing"))
    assert [e.endswith("is null") for e in records.table.column("error").to_pylist()] == [True, True]


def test_chat_messages_given_as_the_prompt_column_point_to_messages_column(tmp_path):
    """A Parquet column of messages is refused at start-up, a JSONL row's list of messages is its row's error;
    both say to set data.messages_column."""
    chat = [{"role": "user", "content": "hi"}]
    pq.write_table(pa.table({"conversation": [chat]}), tmp_path / "in.parquet")
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column="conversation"))
    assert "holds chat messages (a list of role/content structs)" in str(error.value)
    assert str(error.value).endswith("set data.messages_column=conversation instead of data.prompt_column")
    (tmp_path / "in.jsonl").write_text(json.dumps({"conversation": chat, "other": 1}) + "\n")
    records = read_input(DataConfig(path=str(tmp_path / "in.jsonl"), prompt_column="conversation"))
    assert records.table.column("error").to_pylist() == [
        "prompt (column 'conversation') must be a string, got list; it holds chat messages: set "
        "data.messages_column=conversation instead of data.prompt_column"
    ]


@pytest.mark.parametrize("metadata", [b'{"info": {"features": [1, 2]}}', b"not json", b"\xff"])
def test_metadata_that_datasets_did_not_write_gives_the_plain_type(tmp_path, metadata):
    table = pa.table({"text": ["a"], "label": [1]}).replace_schema_metadata({b"huggingface": metadata})
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"^data.prompt_column='label' is a column of type int64 in "):
        read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column="label"))


@pytest.mark.skipif(not hasattr(pa, "json_"), reason="pyarrow < 19 has no JSON extension type")
def test_text_in_an_extension_type_is_still_read(tmp_path):
    """A Parquet column that pyarrow reads as its JSON extension type (a table written with pa.json_()) holds
    text, read as each value's JSON text: the type check refused it as "a column of type extension<arrow.json>,
    not text", though its rows were read as prompts before. A UUID extension column holds no text."""
    table = pa.table({"p": pa.array(['{"q": "2+2?"}', '"hi"'], pa.json_()), "u": pa.array([b"\0" * 16] * 2)})
    table = table.set_column(1, "u", table.column("u").cast(pa.binary(16)).cast(pa.uuid()))
    pq.write_table(table, tmp_path / "in.parquet")
    records = read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column="p"))
    assert records.table.column("prompt").to_pylist() == ['{"q": "2+2?"}', '"hi"']
    with pytest.raises(
        InputError, match=r"is a column of type extension<arrow.uuid> .* Columns holding text: 'p'"
    ):
        read_input(DataConfig(path=str(tmp_path / "in.parquet"), prompt_column="u"))
