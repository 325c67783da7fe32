"""An input with an `id` column read without data.id_column gets derived ids, its `id` values going to
metadata: the start-up log warns once, naming the column and the setting that would use it."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import (
    BUILTIN_PROMPTS,
    ClusterConfig,
    DataConfig,
    JobConfig,
    OutputConfig,
    RunConfig,
)
from pipeline.runner.plan import plan


def _warnings(caplog, tmp_path, path, **data) -> list[str]:
    job = JobConfig(
        data=DataConfig(path=str(path), **data),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(shard_size=2),
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="canvasflow"):
        plan(job)
    return [
        r.getMessage() for r in caplog.records if r.name == "canvasflow" and "id_column" in r.getMessage()
    ]


def _jsonl(tmp_path, rows):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_id_column_without_data_id_column_is_warned_about_once(tmp_path, caplog):
    path = _jsonl(tmp_path, [{"id": f"q{i}", "prompt": f"Add: {i}+1"} for i in range(3)])
    assert _warnings(caplog, tmp_path, path) == [
        "the input has a column 'id', but data.id_column is unset: the rows get ids derived from their "
        "position and content, and 'id' is carried in metadata as any other column. Set data.id_column=id "
        "to use its values as the rows' ids."
    ]
    assert _warnings(caplog, tmp_path, path, id_column="id") == [], "used: nothing to warn about"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_warning_says_when_the_column_is_not_carried_either(tmp_path, caplog, fmt):
    if fmt == "parquet":
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"ID": ["a", "b"], "prompt": ["Add: 1+2", "Add: 3+4"], "n": [1, 2]}), path)
    else:
        path = _jsonl(tmp_path, [{"ID": "a", "prompt": "Add: 1+2", "n": 1}])
    (message,) = _warnings(caplog, tmp_path, path, metadata_columns=["n"])
    assert "the input has a column 'ID', but data.id_column is unset" in message
    assert "'ID' is not carried (data.metadata_columns leaves it out). Set data.id_column=ID" in message


def test_no_warning_without_an_id_column_nor_for_the_shipped_prompts(tmp_path, caplog):
    path = _jsonl(tmp_path, [{"uid": "a", "prompt": "Add: 1+2"}])
    assert _warnings(caplog, tmp_path, path) == []
    # the shipped prompts have an `id` column, which the shipped config leaves to metadata
    assert _warnings(caplog, tmp_path, BUILTIN_PROMPTS) == []
