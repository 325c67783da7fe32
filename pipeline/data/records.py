"""Normalised input records: one per input row, with a stable id, the prompt (or chat messages) and, for
rows that cannot be generated from, the reason.

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
import json
import math
import mmap
import os
import tempfile
from array import array
from collections.abc import Callable, Set
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
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


class NotText(TypeError):
    """A binary value (bytes, e.g. of a Parquet binary column) that is not UTF-8 text, which JSON cannot hold."""

    def __init__(self, error: UnicodeDecodeError) -> None:
        super().__init__(f"binary data that is not UTF-8 text (byte {error.start} of the value)")


def _text_default(value: Any) -> Any:
    """JSON for a value json has no type for: bytes as their UTF-8 text (NotText where they are not one), the
    others (dates, decimals) as str()."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotText(e) from None
    return str(value)


def _lossy_default(value: Any) -> Any:
    """As _text_default, bytes that are not UTF-8 with their bad bytes replaced: for showing a row."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _json(value: Any, default: Callable[[Any], Any] = _text_default) -> str:
    """Strict JSON text: NaN and +-Infinity (which JSON has no spelling for) are written as null."""
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=default, allow_nan=False)
    except ValueError:  # a non-finite float somewhere
        return json.dumps(
            _finite(value), ensure_ascii=False, sort_keys=True, default=default, allow_nan=False
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


SURROGATE_HINT = "not valid UTF-8 (it holds a lone surrogate such as \\ud800, e.g. half of an escaped emoji)"
# What a text that shows nothing may hold: whitespace, NUL (fixed-width exports pad with it) and the zero-width
# characters (a byte-order mark, a space or joiner of zero width), which str.strip() keeps.
INVISIBLE = "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "\x00\u200b\u200c\u200d\u2060\ufeff"


def _check_text(value: Any, what: str, *, allow_blank: bool = False) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason); a blank text is a reason unless `allow_blank`."""
    if value is None:
        return None, f"{what} is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{what} is not valid UTF-8 (byte {e.start})"
    if not isinstance(value, str):
        return None, f"{what} must be a string, got {type(value).__name__}"
    if has_surrogate(value):
        return None, f"{what} is {SURROGATE_HINT}"
    if not allow_blank and not value.strip(INVISIBLE):
        if not value.strip():
            return None, f"{what} is empty"
        return (
            None,
            f"{what} is blank: it holds only {ascii(value)[1:-1][:60]} (NUL or zero-width characters)",
        )
    return value, None


def _check_messages(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, str):  # e.g. a column of json.dumps(messages): its text is not parsed
        return None, (
            "messages must be a non-empty list of {role, content} objects, got a string (JSON text is not "
            "parsed: store the messages as a list of objects, or give the text in data.prompt_column)"
        )
    if not isinstance(value, list) or not value:
        return None, "messages must be a non-empty list of {role, content} objects"
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, f"messages[{i}] must be an object with a string 'role'"
        if has_surrogate(message["role"]):
            return None, f"messages[{i}].role is {SURROGATE_HINT}"
        content, problem = _check_content(message.get("content"), f"messages[{i}].content")
        if problem:
            return None, problem
        fields, problem = _other_fields(message, f"messages[{i}]")
        if problem:
            return None, problem
        messages.append({**fields, "role": message["role"], "content": content})  # binary content as its text
    return _json(messages), None


def _other_fields(message: dict[Any, Any], what: str) -> tuple[dict[str, Any], str | None]:
    """The message's keys besides role and content (name, tool_calls, tool_call_id, ...), for the chat
    template as given; a null one is no key (a Parquet message struct has every message's fields, null where
    it has none). Or ({}, reason) for a value the records' JSON cannot hold."""
    fields = {}
    for key, value in message.items():
        if key in ("role", "content") or value is None:
            continue
        if not isinstance(key, str) or has_surrogate(key):
            return (
                {},
                f"{what} has the key {_valid_text(repr(key))}, which is not a valid JSON key (a string)",
            )
        where = f"{what}.{key}"
        try:
            text = _json(value)
        except NotText as e:
            return {}, f"{where} holds {e}; give it as text"
        except RecursionError:
            return {}, f"{where} is nested too deeply to store as JSON; flatten it"
        except (TypeError, ValueError) as e:
            return {}, f"{where} is not JSON data ({e})"
        if has_surrogate(text):
            return {}, f"{where} is {SURROGATE_HINT}"
        fields[key] = value
    return fields, None


# How the text parts of a message's content are joined: as vLLM's OpenAI-compatible server does for a chat
# template that takes string content (the OpenAI API leaves it unspecified; a multimodal template that loops
# over the parts writes them with nothing between, which would run "Hi" and "there" together).
PARTS_SEPARATOR = "\n"
TEXT_PART = '{"type": "text", "text": "..."}'


def _check_content(value: Any, what: str) -> tuple[str | None, str | None]:
    """A message's content: a string, or a list of OpenAI-format text parts, their texts joined into one."""
    if not isinstance(value, (list, tuple)):
        return _check_text(value, what)
    if not value:
        return (
            None,
            f"{what} is an empty list of parts; give the text as a string or as text parts, {TEXT_PART}",
        )
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            got = (
                "an object without a string 'type'"
                if isinstance(part, dict)
                else ("null" if part is None else f"a {type(part).__name__}")
            )
            return None, f"{what}[{j}] is {got}; a content part is an object such as {TEXT_PART}"
        if kind != "text":
            return None, (
                f"{what}[{j}] is a part of type {_valid_text(kind)!r}; only text parts ({TEXT_PART}) are "
                "supported: drop the other parts from the input, or give what they hold as text"
            )
        text, problem = _check_text(part.get("text"), f"{what}[{j}].text", allow_blank=True)
        if problem:
            return None, problem
        texts.append(text)
    return _check_text(PARTS_SEPARATOR.join(texts), what)


def check_prompt_value(value: Any) -> tuple[str | None, bool, str | None]:
    """A prompt as the Python API takes it (a string, or a chat: a list of {role, content} messages), checked
    as the readers check an input row's: (text, is_chat, None), the chat as the JSON text rows carry, or
    (None, is_chat, reason)."""
    if isinstance(value, (list, tuple)):
        text, problem = _check_messages(list(value))
        return text, True, problem
    text, problem = _check_text(value, "prompt")
    return text, False, problem


def _template_value(value: Any, name: str) -> tuple[str | None, str | None]:
    """(text, None): column `name`'s value as data.prompt_template writes it; or (None, reason)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"column {name!r} is {value} (not a finite number); data.prompt_template needs a value"
    if isinstance(value, float) and float(np.float32(value)) == value:
        return min(
            repr(value), str(np.float32(value)), key=len
        ), None  # a float32 column's 0.1, not 0.1000000015
    if isinstance(value, (bool, int, float, Decimal)):  # Decimal: a Parquet decimal column's, "1.50"
        return str(value), None
    if not isinstance(value, (str, bytes)):
        kind = "null" if value is None else f"a {type(value).__name__}"
        return None, f"column {name!r} is {kind}; data.prompt_template fills strings and numbers"
    return _check_text(value, f"column {name!r}", allow_blank=True)  # blank values are allowed


def _valid_text(text: str) -> str:
    """`text` with lone surrogates escaped (\\ud800), so that it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogate(text) else text


def _safe_json(value: Any) -> str:
    try:
        return _json(value, _lossy_default)
    except RecursionError:
        return "<nested too deeply to show>"


def _binary_problem(extra: dict[str, Any]) -> str:
    """Why the columns `extra`, one of which holds bytes that are not UTF-8 text, cannot be metadata."""
    for name, value in extra.items():
        try:
            _json(value)
        except NotText as e:
            return (
                f"column {name!r} holds {e}, which the JSON of the metadata column cannot hold; leave the "
                "column out (data.metadata_columns lists the columns to carry) or encode its values as text "
                "(e.g. base64) in the input"
            )
        except RecursionError:
            continue
    return "the other columns hold binary data that is not UTF-8 text"


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
                raw = raw or _safe_json(row)
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
        kept, shown = record["prompt"], record["raw"]
        chars = len(rid) + len(kept or "") + len(metadata or "") + len(error or "") + len(shown or "")
        if self.chars + chars > BATCH_CHARS and self.columns["id"]:  # a batch over it holds one row alone
            self._flush()
        self.chars += chars
        for name, value in record.items():
            self.columns[name].append(value)
        self.hash.update(_json([rid, kept, is_chat, metadata, error]).encode("utf-8", "replace"))
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
            text = _json(extra)
        except RecursionError:
            return None, "the other columns are nested too deeply to store as JSON metadata; flatten them"
        except NotText:
            return None, _binary_problem(extra)
        if not has_surrogate(text):
            return text, None
        for name, value in extra.items():
            if has_surrogate(name):
                return None, f"a column name ({_valid_text(name)!r}) is {SURROGATE_HINT}"
            if has_surrogate(_json(value)):
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
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"id in column {column!r} must be a string or an integer, got {type(value).__name__}"
        text = str(value)
        if has_surrogate(text):
            return None, f"id in column {column!r} is {SURROGATE_HINT}"
        if not text.strip():
            return None, f"empty id (column {column!r})"
        return text, None

    def _content(self, row: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        if self.data.prompt_template:
            return self._templated(row)
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

    def _templated(self, row: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        """The prompt data.prompt_template makes of the row's columns (module pipeline/data/prompts.py)."""
        missing = [name for name in self.template_fields if name not in row]
        if missing:
            return None, False, f"missing column(s) {', '.join(map(repr, missing))} of data.prompt_template"
        self.rows_with_prompt += 1
        values = {}
        for name in self.template_fields:
            text, problem = _template_value(row[name], name)
            if problem:
                return None, False, problem
            values[name] = text
        prompt, problem = _check_text(
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
