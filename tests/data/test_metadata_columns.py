"""data.metadata_columns: which input columns reach the output's `metadata`, and which are read at all."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from pipeline.config.schema import ConfigError, DataConfig, JobConfig
from pipeline.config.validate import validate_job
from pipeline.data.readers import InputError, read_input
from pipeline.runner.identity import config_fingerprint

PNG = b"\x89PNG\r\n\x1a\n"  # bytes that are no UTF-8 text: an image column


def _records(path, **config) -> list[dict]:
    return read_input(DataConfig(path=str(path), **config)).table.to_pylist()


def _write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_only_the_listed_columns_are_carried(tmp_path):
    data = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "a", "source": "web", "difficulty": 3, "doc": "long text"},
            {"prompt": "b", "source": "x"},
        ],
    )
    rows = _records(data, metadata_columns=["difficulty", "source"])
    assert [json.loads(r["metadata"]) for r in rows] == [{"source": "web", "difficulty": 3}, {"source": "x"}]
    assert [r["metadata"] for r in _records(data, metadata_columns=[])] == [None, None]
    everything = _records(data)
    assert json.loads(everything[0]["metadata"]) == {"source": "web", "difficulty": 3, "doc": "long text"}


def test_a_parquet_image_column_left_out_is_not_read_and_rejects_no_row(tmp_path):
    """Without data.metadata_columns every row of an input with an image column is an error row (its bytes are
    no text for the JSON of `metadata`); listing the columns to carry leaves the image unread."""
    path = tmp_path / "in.parquet"
    note = pa.array([b"caf\xe9", b"ok"], pa.binary()).view(pa.string())  # invalid UTF-8 in a string column
    table = pa.table(
        {"prompt": ["Add: 1+2", "Add: 2+2"], "image": [PNG, PNG], "source": ["a", "b"], "note": note}
    )
    pq.write_table(table, path, row_group_size=1)
    assert ["column 'note' is not valid UTF-8" in r["error"] for r in _records(path)] == [True, False]
    assert "column 'image' holds binary data" in _records(path)[1]["error"]
    rows = _records(path, metadata_columns=["source"])
    assert [(r["prompt"], r["error"], json.loads(r["metadata"])) for r in rows] == [
        ("Add: 1+2", None, {"source": "a"}),
        ("Add: 2+2", None, {"source": "b"}),
    ]


def test_a_saved_dataset_reads_only_the_columns_it_carries(tmp_path):
    Dataset.from_dict({"prompt": ["p"], "blob": [PNG], "lang": ["en"]}).save_to_disk(str(tmp_path / "hf"))
    (row,) = _records(tmp_path / "hf", metadata_columns=["lang"])
    assert row["error"] is None and json.loads(row["metadata"]) == {"lang": "en"}


def test_a_listed_column_that_no_row_has_fails_at_startup_naming_the_columns(tmp_path):
    data = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "source": "web"}])
    with pytest.raises(InputError) as error:
        _records(data, metadata_columns=["source", "sorce"])
    assert str(error.value) == (
        f"data.metadata_columns names 'sorce', which no row of {str(data)!r} has; columns seen: prompt, source. "
        "Fix data.metadata_columns."
    )
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "image": [PNG]}), path)
    with pytest.raises(
        InputError, match="names 'sorce', which no row of .* has; columns seen: image, prompt"
    ):
        _records(path, metadata_columns=["sorce"])


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("source", "must be a list of column names"),
        (["source", ""], "holds '', which is no column name"),
        (["a", "a"], "names 'a' twice"),
    ],
)
def test_a_metadata_columns_value_that_is_no_list_of_names_is_refused(value, why):
    job = JobConfig(data=DataConfig(metadata_columns=value))
    with pytest.raises(ConfigError, match=f"^data.metadata_columns=.* {why}"):
        validate_job(job)


def test_runs_without_metadata_columns_keep_their_config_fingerprint():
    """Run ids derive from the config fingerprint: a new setting left unset must not move existing runs."""
    job = JobConfig()
    unset = config_fingerprint(job, "model", {})
    job.data.metadata_columns = ["source"]
    assert config_fingerprint(job, "model", {}) != unset
    job.data.metadata_columns = None
    assert (
        config_fingerprint(job, "model", {})
        == unset
        == (
            "924dffb29661ef481c5919027523fe1ce377334e2b688ca0632c4dd4e3cad53a"  # before the setting existed
        )
    )
