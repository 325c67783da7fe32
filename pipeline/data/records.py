"""Normalised input records: one per input row, with a stable id, the prompt (or chat messages) and, for
rows that cannot be generated from, the reason (the checks of the row's values: pipeline/data/values.py).

Ids: the value of `data.id_column` when declared (later duplicates become error rows), else derived from the
row's position and content, so the same input always gets the same ids.

What the driver holds per row stays small, so that one run can take a large input: the records go, a batch at
a time, to an Arrow file in the temporary folder (TMPDIR) that is read back memory-mapped (page cache, which
the kernel can evict, not process memory), and the duplicate-id check keeps an 8-byte hash per row. Only when
two hashes are equal is the input read again, tracking just those ids (`repeated_ids`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import tempfile
import uuid
from array import array
from collections.abc import Set
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config.schema import DataConfig
from pipeline.data.values import (
    SURROGATE_HINT,
    NotText,
    binary_problem,
    blank_problem,
    check_messages,
    check_text,
    has_surrogate,
    safe_json,
    template_value,
    to_json,
    valid_text,
)

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_index", pa.int64()),  # position in the input (non-blank JSONL lines, table rows)
        ("prompt", pa.string()),  # the prompt string, or the chat messages as JSON
        ("is_chat", pa.bool_()),
        ("metadata", pa.string()),  # the row's other columns as JSON (carried to the output)
        ("error", pa.string()),  # why the row cannot be generated from; null for good rows
        ("raw", pa.string()),  # the offending input, truncated, for error rows
    ]
)
RAW_LIMIT = 2000
BATCH_ROWS = 65536  # records buffered as Python objects before they become an Arrow batch
# ... or fewer, so that their text stays within this many characters: an Arrow string column holds at most 2 GiB
# (a batch of 65,536 rows of 33 KB documents failed with "Cannot convert pyarrow.lib.ChunkedArray to
# pyarrow.lib.Array"); 2**28 characters are at most 1 GiB of UTF-8 in any one column.
BATCH_CHARS = 1 << 28
SPILL_PREFIX = "canvasflow-records-"


class SpillError(RuntimeError):
    """The records could not be written to the temporary folder; the message names it and the fix."""


class InputChangedError(RuntimeError):
    """A second read of the input (to mark repeated ids) did not see the rows of the first."""


@dataclass
class RecordTable:
    table: pa.Table  # RECORD_SCHEMA
    fingerprint: str  # sha256 of the normalised records
    files: list[str]
    format: str
    skipped_files: int = 0  # files of a folder input that are not read (not a data suffix); logged by name
    columns: frozenset[str] = frozenset()  # the input's columns (of the rows read), read or not

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def num_errors(self) -> int:
        return self.table.num_rows - self.table.column("error").null_count


def derived_id(index: int, content: str) -> str:
    return hashlib.sha256(f"{index}\x1f{content}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RecordSpill:
    """Record batches written to an Arrow file under `folder` (None: the temporary folder) and read back
    memory-mapped. The file is unlinked as soon as it is created, so that a driver killed mid-read leaves
    nothing behind: it is written and mapped through its open descriptor, and the mapping keeps its pages
    until the table is gone. On a tmpfs `$TMPDIR` (some distributions' /tmp) those pages are memory, not
    page cache: point TMPDIR at a disk for large inputs."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder or tempfile.gettempdir()
        self.file: Any = None  # the unlinked file, open for writing and reading
        self.writer: pa.ipc.RecordBatchFileWriter | None = None
        self.bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        try:
            if self.writer is None:
                fd, path = tempfile.mkstemp(prefix=SPILL_PREFIX, suffix=".arrow", dir=self.folder)
                os.unlink(path)
                self.file = os.fdopen(fd, "w+b")
                self.writer = pa.ipc.new_file(pa.PythonFile(self.file, mode="w"), RECORD_SCHEMA)
            self.writer.write_batch(batch)
        except OSError as e:
            self.discard()
            raise SpillError(
                f"cannot write the input's records to the temporary folder {self.folder} ({e}); the driver "
                f"keeps them there while the run lasts (about {self.bytes + batch.nbytes:,} bytes so far). "
                "Set TMPDIR to a local folder with room for about the input's uncompressed size."
            ) from None
        self.bytes += batch.nbytes

    def table(self) -> pa.Table:
        assert self.writer is not None and self.file is not None
        self.writer.close()
        self.writer = None
        self.file.flush()
        mapped = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the descriptor
        self.discard()
        # Zero-copy: the table's buffers are slices of the mapping, which they keep alive.
        return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped))).read_all()

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


class RecordBuilder:
    """Turns input rows into records. `repeated`: None on a first read, which does not check ids for
    duplicates but keeps a hash of each (`repeated_ids` then names the ids that may repeat); on a second read,
    the ids to check: a later row with one of them is a duplicate. A row's id can only be a duplicate if it
    is among those, so the second read's records equal those of a check over every id."""

    def __init__(
        self,
        data: DataConfig,
        repeated: Set[str] | None = None,
        first_read: array | None = None,
    ) -> None:
        self.data = data
        self.columns: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
        self.chars = 0  # characters of the buffered records' text
        self.spill = RecordSpill()
        self.written = 0
        self.hash = hashlib.sha256()
        self.repeated = repeated
        self.id_hashes = array("q")  # hash(id) per row (first read)
        self.seen_ids: dict[str, int] = {}  # first row of each id in `repeated` (second read)
        self.first_read = first_read  # the first read's id hashes, which the second read's rows must match
        self.rows = 0
        self.columns_seen: set[str] = set()
        self.rows_with_prompt = 0
        self.rows_with_id = 0  # rows that have the data.id_column key (null or not)
        self.parsed_rows = 0
        # data.metadata_columns: the columns carried in `metadata` (None: all but the prompt's and the id's)
        self.metadata_columns = None if data.metadata_columns is None else frozenset(data.metadata_columns)

    @property
    def all_unparseable(self) -> bool:
        return self.parsed_rows == 0

    def add(self, index: int, row: dict[str, Any] | None, error: str | None, raw: str | None) -> None:
        rid, prompt, is_chat, metadata = None, None, False, None
        if row is not None:
            self.parsed_rows += 1
            self.columns_seen.update(row)
            rid, id_error = self._declared_id(index, row)
            prompt, is_chat, content_error = self._content(row)
            metadata, metadata_error = self._metadata(row)
            error = id_error or content_error or metadata_error
            if error:
                raw = raw or safe_json(row)
        if rid is None:
            rid = derived_id(index, prompt if prompt is not None else (raw or ""))
        # Every row's id counts, error rows' too: a later row with the id of a rejected one is a duplicate (the
        # id would otherwise name two input rows, one in errors/ and one in data/).
        self.rows += 1
        if self.repeated is None:
            self.id_hashes.append(hash(rid))
        else:
            first = self.first_read
            if first is not None and (index >= len(first) or first[index] != hash(rid)):
                raise InputChangedError(f"row {index} has another id than when the input was first read")
            if rid in self.repeated:
                if rid in self.seen_ids:
                    if error is None:
                        error = f"duplicate id {rid!r} (first seen at input row {self.seen_ids[rid]})"
                        raw = raw or (safe_json(row) if row is not None else None)
                else:
                    self.seen_ids[rid] = index
        record = {
            "id": rid,
            "source_index": index,
            "prompt": prompt if error is None else None,
            "is_chat": is_chat,
            "metadata": metadata,
            "error": error,
            "raw": valid_text(raw[:RAW_LIMIT]) if (error and raw) else None,
        }
        kept, shown = record["prompt"], record["raw"]
        chars = len(rid) + len(kept or "") + len(metadata or "") + len(error or "") + len(shown or "")
        if self.chars + chars > BATCH_CHARS and self.columns["id"]:  # a batch over it holds one row alone
            self._flush()
        self.chars += chars
        for name, value in record.items():
            self.columns[name].append(value)
        self.hash.update(to_json([rid, kept, is_chat, metadata, error]).encode("utf-8", "replace"))
        if len(self.columns["id"]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Moves the buffered records into an Arrow batch in the spill file."""
        self.spill.write(pa.RecordBatch.from_pydict(self.columns, schema=RECORD_SCHEMA))
        self.written += 1
        self.columns = {name: [] for name in RECORD_SCHEMA.names}
        self.chars = 0

    def _metadata(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        """(the other columns as JSON | None, None), or (None, reason) naming the offending column."""
        keep = self.metadata_columns
        extra = {
            k: v for k, v in row.items() if (k in keep if keep is not None else k not in self._reserved())
        }
        if not extra:
            return None, None
        try:
            text = to_json(extra)
        except RecursionError:
            return None, "the other columns are nested too deeply to store as JSON metadata; flatten them"
        except NotText:
            return None, binary_problem(extra)
        if not has_surrogate(text):
            return text, None
        for name, value in extra.items():
            if has_surrogate(name):
                return None, f"a column name ({valid_text(name)!r}) is {SURROGATE_HINT}"
            if has_surrogate(to_json(value)):
                return None, f"column {name!r} is {SURROGATE_HINT}; fix or drop that value in the input"
        return None, f"the other columns are {SURROGATE_HINT}"

    def _reserved(self) -> set[str]:
        """Columns not carried in metadata: the prompt's (with a prompt template, its columns stay there) and
        the id's."""
        names = set() if self.data.prompt_template else {self.data.messages_column or self.data.prompt_column}
        if self.data.id_column:
            names.add(self.data.id_column)
        return names

    def _declared_id(self, index: int, row: dict[str, Any]) -> tuple[str | None, str | None]:
        column = self.data.id_column
        if not column:
            return None, None
        if column in row:
            self.rows_with_id += 1
        value = row.get(column)
        if value is None:
            return None, f"missing id (column {column!r})"
        if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
            value = int(value)  # a decimal column of integers: SQL NUMBER(38, 0) exports, e.g. Snowflake's
        if isinstance(value, uuid.UUID):  # a UUID column's (Parquet's UUID type, pyarrow's pa.uuid())
            value = str(
                value
            )  # its canonical text, 8-4-4-4-12 lowercase hex: the id a JSONL string of it gives
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            got = type(value).__name__
            if isinstance(value, bytes):
                got += (
                    " (a binary column); if its values are UUIDs, write the column with Parquet's UUID type "
                    "(pyarrow: pa.uuid()) or as text"
                )
            return None, f"id in column {column!r} must be a string or an integer, got {got}"
        text = str(value)
        if has_surrogate(text):
            return None, f"id in column {column!r} is {SURROGATE_HINT}"
        if not text.strip():
            return None, f"empty id (column {column!r})"
        if problem := blank_problem(text, f"id in column {column!r}"):  # NUL or zero-width characters only
            return None, problem
        return text, None

    def _content(self, row: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        if self.data.prompt_template:
            return self._templated(row)
        if self.data.messages_column:
            column = self.data.messages_column
            if column not in row:
                return None, True, f"missing column {column!r}"
            self.rows_with_prompt += 1
            messages, problem = check_messages(row[column])
            return messages, True, problem
        column = self.data.prompt_column
        if column not in row:
            return None, False, f"missing column {column!r}"
        self.rows_with_prompt += 1
        prompt, problem = check_text(row[column], f"prompt (column {column!r})")
        if problem and _looks_like_chat(row[column]):
            problem += (
                f"; it holds chat messages: set data.messages_column={column} instead of data.prompt_column"
            )
        return prompt, False, problem

    def _templated(self, row: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        """The prompt data.prompt_template makes of the row's columns (module pipeline/data/prompts.py)."""
        missing = [name for name in self.template_fields if name not in row]
        if missing:
            return None, False, f"missing column(s) {', '.join(map(repr, missing))} of data.prompt_template"
        self.rows_with_prompt += 1
        values = {}
        for name in self.template_fields:
            text, problem = template_value(row[name], name)
            if problem:
                return None, False, problem
            values[name] = text
        prompt, problem = check_text(
            self.data.prompt_template.format_map(values), "prompt (data.prompt_template)"
        )
        return prompt, False, problem

    @functools.cached_property
    def template_fields(self) -> list[str]:
        from pipeline.data.prompts import template_fields

        return template_fields(self.data.prompt_template)

    def finish(self) -> pa.Table:
        if self.columns["id"] or not self.written:
            self._flush()
        return self.spill.table()

    def discard(self) -> None:
        """Removes the spill file of a read that will not finish."""
        self.spill.discard()

    def repeated_ids(self, table: pa.Table) -> frozenset[str]:
        """After a first read: the ids whose hash occurs more than once (a superset of the repeated ids)."""
        hashes = np.frombuffer(self.id_hashes, dtype=np.int64)
        ordered = np.sort(hashes)
        clashes = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not clashes.size:
            return frozenset()
        rows = np.flatnonzero(np.isin(hashes, clashes))
        return frozenset(table.column("id").take(pa.array(rows)).to_pylist())

    def fingerprint(self) -> str:
        return self.hash.hexdigest()


def _looks_like_chat(value: Any) -> bool:
    """Whether `value` is a list of {"role": ..., ...} messages (a chat given as data.prompt_column)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
