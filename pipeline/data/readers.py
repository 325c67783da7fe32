"""Reads a prompt dataset into records, one per input row, bad rows included.

Sources: JSONL and Parquet files or directories of them (local or s3://), a Hugging Face dataset saved with
`save_to_disk`, `datasets.load_dataset` arguments (format=hf; both loaded by pipeline/data/hf_datasets.py),
and the shipped prompts. The rows come from pipeline/data/jsonl.py (JSON Lines) and table_rows.py (Parquet,
Arrow tables); records.py makes them records. Every input row (or non-blank JSONL line) yields exactly one
record; a row that cannot be used carries an `error` and goes to the run's errors/ instead of the output.
Problems with the input as a whole (unreadable file, missing prompt column) raise InputError before any GPU
work.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config.schema import BUILTIN_PROMPTS, DataConfig
from pipeline.data.files import InputError, detect_format, list_files  # InputError: the readers' error
from pipeline.data.hf_datasets import load_hub, saved_dataset
from pipeline.data.jsonl import jsonl_rows
from pipeline.data.records import InputChangedError, RecordBuilder, RecordTable, SpillError
from pipeline.data.table_rows import parquet_rows, table_rows
from pipeline.data.values import valid_text

logger = logging.getLogger(__name__)

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "prompts.jsonl"
READ_PROGRESS_S = 10.0  # seconds between progress lines while a large input is read
# Temporary folders of S3 input downloads: removed when the read ends, left behind by a killed driver.
DOWNLOAD_PREFIXES = ("canvasflow-input-", "canvasflow-dataset-")
STALE_DOWNLOAD_S = 24 * 3600.0  # a download folder untouched this long belongs to no live read


def resolve_path(path: str) -> str:
    return str(SHIPPED_PROMPTS) if path == BUILTIN_PROMPTS else path


def read_input(
    data: DataConfig, *, endpoint_url: str | None = None, region: str | None = None
) -> RecordTable:
    """All records of the input, in input order, with a fingerprint of their content."""
    remove_stale_downloads()
    path = resolve_path(data.path)
    files, skipped = list_files(path, endpoint_url=endpoint_url, region=region)
    fmt = detect_format(path, data.format, files)
    if data.split is not None and fmt in ("jsonl", "parquet"):  # else every row is read, whatever the split
        raise InputError(
            f"data.split={data.split!r} picks a split of a Hugging Face dataset, but data.path={data.path!r} is "
            f"{fmt} input, which has no splits: unset data.split to read all of it, or point data.path at the "
            "split's file or folder"
        )
    builder, table = _build(data, path, files, fmt, endpoint_url, region, repeated=None)
    if table.num_rows == 0:
        raise InputError(f"data.path={data.path!r} holds no rows")
    # With data.limit only the first rows were read: the message says so, as later rows may have the column.
    rows = f"{data.path!r}" if data.limit is None else f"the first {data.limit} of {data.path!r} (data.limit)"
    if builder.rows_with_prompt == 0 and not builder.all_unparseable:
        seen = valid_text(", ".join(sorted(builder.columns_seen))) or "none"
        if data.prompt_template:
            raise InputError(
                f"no row of {rows} has every column of data.prompt_template "
                f"({', '.join(builder.template_fields)}); columns seen: {seen}. Fix data.prompt_template."
            )
        column = data.messages_column or data.prompt_column
        raise InputError(
            f"no row of {rows} has the prompt column {column!r}; columns seen: {seen}. "
            "Set data.prompt_column (or data.messages_column)."
        )
    if data.id_column and builder.rows_with_id == 0 and not builder.all_unparseable:
        raise InputError(
            f"data.id_column={data.id_column!r} is not a column of {rows} (no row has it); columns "
            f"seen: {valid_text(', '.join(sorted(builder.columns_seen))) or 'none'}. Fix data.id_column, or "
            "leave it unset (null) to derive stable ids from each row's position and content."
        )
    if data.metadata_columns and not builder.all_unparseable:
        unseen = [name for name in data.metadata_columns if name not in builder.columns_seen]
        if unseen:
            raise InputError(
                f"data.metadata_columns names {', '.join(map(repr, unseen))}, which no row of {rows} has; "
                f"columns seen: {valid_text(', '.join(sorted(builder.columns_seen))) or 'none'}. Fix "
                "data.metadata_columns."
            )
    repeated = builder.repeated_ids(table)
    if repeated:  # rare: marking the later rows of an id needs the rows themselves, so read them again
        logger.info(
            "%d id(s) may occur more than once in the input: reading it again to mark them", len(repeated)
        )
        del table
        first = builder
        builder, table = _build(data, path, files, fmt, endpoint_url, region, repeated, first.id_hashes)
        if builder.rows != first.rows:
            raise _changed(data, f"{first.rows} rows, then {builder.rows}")
    return RecordTable(
        table=table,
        fingerprint=builder.fingerprint(),
        files=files,
        format=fmt,
        skipped_files=len(skipped),
        columns=frozenset(builder.columns_seen),
    )


def unused_id_column(data: DataConfig, columns: frozenset[str]) -> str | None:
    """A warning for an input with an `id` column (any case) that data.id_column does not name: its rows get
    derived ids, which is seldom what such an input means. None otherwise, and for the shipped prompts, whose
    `id` column the shipped config leaves to metadata (their runs' derived ids are what they are)."""
    if data.id_column or data.path == BUILTIN_PROMPTS:
        return None
    prompt = None if data.prompt_template else (data.messages_column or data.prompt_column)
    names = sorted(name for name in columns if name.lower() == "id" and name != prompt)
    if not names:
        return None
    name = "id" if "id" in names else names[0]
    if data.metadata_columns is None or name in data.metadata_columns:
        where = "is carried in metadata as any other column"
    else:
        where = "is not carried (data.metadata_columns leaves it out)"
    return (
        f"the input has a column {valid_text(name)!r}, but data.id_column is unset: the rows get ids derived "
        f"from their position and content, and {valid_text(name)!r} {where}. Set "
        f"data.id_column={valid_text(name)} to use its values as the rows' ids."
    )


def _changed(data: DataConfig, detail: str) -> InputError:
    return InputError(
        f"data.path={data.path!r} changed while it was read: {detail}. A run needs an input that stays as it "
        "is; copy it to a place nothing writes to"
    )


def remove_stale_downloads(folder: str | None = None, older_than_s: float = STALE_DOWNLOAD_S) -> int:
    """Removes the S3 download folders that killed drivers left in the temporary folder: those whose files
    were all written more than a day ago (no read of an input lasts that long); returns how many."""
    folder = folder or tempfile.gettempdir()
    removed = 0
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(DOWNLOAD_PREFIXES) and e.is_dir()]
    except OSError:
        return 0
    for entry in entries:
        try:
            newest = max(
                [entry.stat().st_mtime]
                + [
                    os.stat(os.path.join(root, n)).st_mtime
                    for root, _, names in os.walk(entry.path)
                    for n in names
                ]
            )
        except OSError:
            continue
        if time.time() - newest > older_than_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d stale download folder(s) of killed reads from %s", removed, folder)
    return removed


def _build(
    data: DataConfig,
    path: str,
    files: list[str],
    fmt: str,
    endpoint_url: str | None,
    region: str | None,
    repeated: frozenset[str] | None,
    first_read: Any = None,
) -> tuple[RecordBuilder, pa.Table]:
    """Every row of the input through a RecordBuilder: the builder (counts, fingerprint) and the records."""
    builder = RecordBuilder(data, repeated=repeated, first_read=first_read)
    seen = builder.columns_seen  # also the columns of the Parquet files and tables, read or not
    if fmt == "jsonl":
        rows = jsonl_rows(files, endpoint_url, region)
    elif fmt == "parquet":
        rows = parquet_rows(files, data, endpoint_url, region, seen)
    elif fmt == "hf_disk":
        rows = _saved_dataset_rows(path, data, files, endpoint_url, region, seen)
    elif fmt == "hf":
        rows = table_rows(load_hub(path, data), data, path, seen)
    else:
        builder.discard()
        raise InputError(f"data.format={fmt!r} is not one of jsonl, parquet, hf_disk, hf")
    started = last_log = time.monotonic()
    try:
        for index, (row, error, raw) in enumerate(rows):
            if data.limit is not None and index >= data.limit:
                break
            builder.add(index, row, error, raw)
            if index % 65536 == 65535 and time.monotonic() - last_log > READ_PROGRESS_S:
                last_log = time.monotonic()
                logger.info(
                    "reading input: %d rows so far (%.0f rows/s)",
                    index + 1,
                    (index + 1) / (last_log - started),
                )
        table = builder.finish()
    except SpillError as e:
        builder.discard()
        raise InputError(str(e)) from None
    except InputChangedError as e:
        builder.discard()
        raise _changed(data, str(e)) from None
    except BaseException:
        builder.discard()
        raise
    return builder, table


def _saved_dataset_rows(
    path: str,
    data: DataConfig,
    files: list[str],
    endpoint_url: str | None,
    region: str | None,
    seen: set[str],
) -> Iterator[tuple]:
    with saved_dataset(path, data, files, endpoint_url, region) as table:
        yield from table_rows(table, data, path, seen)
