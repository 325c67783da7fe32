"""Arrow schemas of the run's output and error rows, and their Parquet serialisation."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("completion_index", pa.int32()),  # which of the prompt's sampler.completions_per_prompt completions
        ("prompt", pa.string()),  # the prompt as given (chat messages as JSON)
        ("completion", pa.string()),
        ("completion_tokens", pa.int32()),  # tokens of the completion (EOS excluded)
        ("prompt_tokens", pa.int32()),  # tokens of the rendered prompt
        ("denoising_steps", pa.int32()),  # decoder forward passes spent on the row
        ("canvases", pa.int32()),
        ("finish_reason", pa.string()),  # eos | length
        ("model", pa.string()),
        ("seed", pa.int64()),
        ("run_id", pa.string()),
        ("source_index", pa.int64()),  # position of the row in the input
        ("metadata", pa.string()),  # the input row's other columns, as JSON
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_index", pa.int64()),
        ("stage", pa.string()),  # read | tokenize | postprocess | worker (a row that killed its worker)
        ("reason", pa.string()),
        ("raw", pa.string()),  # the offending input, truncated
        ("run_id", pa.string()),
    ]
)

# The types a postprocess callable may declare for its columns (`fn.columns`; see pipeline/io/columns.py).
TYPE_NAMES = {"string": pa.string(), "bool": pa.bool_(), "double": pa.float64(), "int64": pa.int64()}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def to_parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    codec = None if compression == "none" else compression
    if table.num_rows:
        pq.write_table(table, sink, compression=codec)
    else:  # no row group: datasets' Parquet reader fails on a row group of 0 rows ("BatchSize must be > 0")
        pq.ParquetWriter(sink, table.schema, compression=codec).close()
    return sink.getvalue()


def from_parquet_bytes(payload: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(payload))
