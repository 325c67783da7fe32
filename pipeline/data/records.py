"""Normalised input records: one per input row, with a stable id, the prompt (or chat messages) and, for
rows that cannot be generated from, the reason.

Ids: the value of `data.id_column` when declared (later duplicates become error rows), else derived from the
row's position and content, so the same input always gets the same ids.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config.schema import DataConfig

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


@dataclass
class RecordTable:
    table: pa.Table  # RECORD_SCHEMA
    fingerprint: str  # sha256 of the normalised records
    files: list[str]
    format: str

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def num_errors(self) -> int:
        return self.table.num_rows - self.table.column("error").null_count


def derived_id(index: int, content: str) -> str:
    return hashlib.sha256(f"{index}\x1f{content}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _json(value: Any) -> str:
    """Strict JSON text: NaN and +-Infinity (which JSON has no spelling for) are written as null."""
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)
    except ValueError:  # a non-finite float somewhere
        return json.dumps(_finite(value), ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


SURROGATE_HINT = "not valid UTF-8 (it holds a lone surrogate such as \\ud800, e.g. half of an escaped emoji)"


def _check_text(value: Any, what: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if value is None:
        return None, f"{what} is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{what} is not valid UTF-8 (byte {e.start})"
    if not isinstance(value, str):
        return None, f"{what} must be a string, got {type(value).__name__}"
    if _has_surrogate(value):
        return None, f"{what} is {SURROGATE_HINT}"
    if not value.strip():
        return None, f"{what} is empty"
    return value, None


def _check_messages(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, list) or not value:
        return None, "messages must be a non-empty list of {role, content} objects"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, f"messages[{i}] must be an object with a string 'role'"
        if _has_surrogate(message["role"]):
            return None, f"messages[{i}].role is {SURROGATE_HINT}"
        _, problem = _check_text(message.get("content"), f"messages[{i}].content")
        if problem:
            return None, problem
    return _json([{"role": m["role"], "content": m["content"]} for m in value]), None


def _valid_text(text: str) -> str:
    """`text` with lone surrogates escaped (\\ud800), so that it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if _has_surrogate(text) else text


def _safe_json(value: Any) -> str:
    try:
        return _json(value)
    except RecursionError:
        return "<nested too deeply to show>"


class RecordBuilder:
    def __init__(self, data: DataConfig) -> None:
        self.data = data
        self.columns: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
        self.batches: list[pa.RecordBatch] = []
        self.hash = hashlib.sha256()
        self.seen_ids: dict[str, int] = {}
        self.columns_seen: set[str] = set()
        self.rows_with_prompt = 0
        self.parsed_rows = 0

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
                raw = raw or _safe_json(row)
        if rid is None:
            rid = derived_id(index, prompt if prompt is not None else (raw or ""))
        # Every row's id counts, error rows' too: a later row with the id of a rejected one is a duplicate (the
        # id would otherwise name two input rows, one in errors/ and one in data/).
        if rid in self.seen_ids:
            if error is None:
                error = f"duplicate id {rid!r} (first seen at input row {self.seen_ids[rid]})"
                raw = raw or (_safe_json(row) if row is not None else None)
        else:
            self.seen_ids[rid] = index
        record = {
            "id": rid,
            "source_index": index,
            "prompt": prompt if error is None else None,
            "is_chat": is_chat,
            "metadata": metadata,
            "error": error,
            "raw": _valid_text(raw[:RAW_LIMIT]) if (error and raw) else None,
        }
        for name, value in record.items():
            self.columns[name].append(value)
        self.hash.update(_json([rid, record["prompt"], is_chat, metadata, error]).encode("utf-8", "replace"))
        if len(self.columns["id"]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Moves the buffered records into an Arrow batch (a few bytes of overhead per value, not ~50)."""
        self.batches.append(pa.RecordBatch.from_pydict(self.columns, schema=RECORD_SCHEMA))
        self.columns = {name: [] for name in RECORD_SCHEMA.names}

    def _metadata(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        """(the other columns as JSON | None, None), or (None, reason) naming the offending column."""
        extra = {k: v for k, v in row.items() if k not in self._reserved()}
        if not extra:
            return None, None
        try:
            text = _json(extra)
        except RecursionError:
            return None, "the other columns are nested too deeply to store as JSON metadata; flatten them"
        if not _has_surrogate(text):
            return text, None
        for name, value in extra.items():
            if _has_surrogate(name):
                return None, f"a column name ({_valid_text(name)!r}) is {SURROGATE_HINT}"
            if _has_surrogate(_json(value)):
                return None, f"column {name!r} is {SURROGATE_HINT}; fix or drop that value in the input"
        return None, f"the other columns are {SURROGATE_HINT}"

    def _reserved(self) -> set[str]:
        names = {self.data.messages_column or self.data.prompt_column}
        if self.data.id_column:
            names.add(self.data.id_column)
        return names

    def _declared_id(self, index: int, row: dict[str, Any]) -> tuple[str | None, str | None]:
        column = self.data.id_column
        if not column:
            return None, None
        value = row.get(column)
        if value is None:
            return None, f"missing id (column {column!r})"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"id in column {column!r} must be a string or an integer, got {type(value).__name__}"
        text = str(value)
        if _has_surrogate(text):
            return None, f"id in column {column!r} is {SURROGATE_HINT}"
        if not text.strip():
            return None, f"empty id (column {column!r})"
        return text, None

    def _content(self, row: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        if self.data.messages_column:
            column = self.data.messages_column
            if column not in row:
                return None, True, f"missing column {column!r}"
            self.rows_with_prompt += 1
            messages, problem = _check_messages(row[column])
            return messages, True, problem
        column = self.data.prompt_column
        if column not in row:
            return None, False, f"missing column {column!r}"
        self.rows_with_prompt += 1
        prompt, problem = _check_text(row[column], f"prompt (column {column!r})")
        return prompt, False, problem

    def finish(self) -> pa.Table:
        if self.columns["id"] or not self.batches:
            self._flush()
        return pa.Table.from_batches(self.batches, schema=RECORD_SCHEMA)

    def fingerprint(self) -> str:
        return self.hash.hexdigest()
