"""Reads a prompt dataset into records, one per input row, bad rows included.

Sources: JSONL and Parquet files or directories of them (local or s3://), a Hugging Face dataset saved with
`save_to_disk`, `datasets.load_dataset` arguments (format=hf; both loaded by pipeline/data/hf_datasets.py),
and the shipped prompts. Every input row (or non-blank JSONL line) yields exactly one record; a row that
cannot be used carries an `error` and goes to the run's errors/ instead of the output. Problems with the input
as a whole (unreadable file, missing prompt column) raise InputError before any GPU work.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config.schema import BUILTIN_PROMPTS, DataConfig
from pipeline.data.files import (  # noqa: F401 (InputError: the readers' error)
    HF_DISK_MARKERS,
    InputError,
    detect_format,
    list_files,
    s3_input_note,
)
from pipeline.data.hf_datasets import load_hub, saved_dataset
from pipeline.data.json_document import document_kind
from pipeline.data.records import InputChangedError, RecordBuilder, RecordTable, SpillError
from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, StoreError, is_s3, split_s3_uri

logger = logging.getLogger(__name__)

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "prompts.jsonl"
UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of the encodings JSON Lines is not read in (UTF-32's first: it starts with UTF-16's).
OTHER_BOMS = (
    ("UTF-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")),
    ("UTF-16", (b"\xff\xfe", b"\xfe\xff")),
)
GZIP_MAGIC = b"\x1f\x8b"
# First bytes of compressed files, to name the codec of one that is read as plain text.
COMPRESSED_MAGIC = (
    ("gzip", re.compile(re.escape(GZIP_MAGIC))),
    ("zstd", re.compile(rb"\x28\xb5\x2f\xfd")),
    ("bzip2", re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)")),  # 'BZh' alone could start a text line
    ("xz", re.compile(rb"\xfd7zXZ\x00")),
)
READ_PROGRESS_S = 10.0  # seconds between progress lines while a large input is read
LONG_LINE = 1 << 20  # bytes: a line this long that opens an array is refused without parsing it
RAW_KEPT = 2000  # characters of such a line kept as its error row's raw text
SCAN_BLOCK = 1 << 16  # bytes read at a time by the check that a file is one JSON document
# Temporary folders of S3 input downloads: removed when the read ends, left behind by a killed driver.
DOWNLOAD_PREFIXES = ("canvasflow-input-", "canvasflow-dataset-")
STALE_DOWNLOAD_S = 24 * 3600.0  # a download folder untouched this long belongs to no live read
JSONL_HINT = (
    'Each line must hold one JSON object, e.g. {"prompt": "..."}; convert a JSON array with '
    "`jq -c '.[]' in.json > in.jsonl`, or set data.format if it is another format."
)
# For a file that is one JSON object: `jq -c '.[]'` would write its values, not rows.
JSONL_HINT_OBJECT = (
    'Each line must hold one JSON object, e.g. {"prompt": "..."}. If the object is one row, write it on one '
    'line: `jq -c . in.json > in.jsonl`; if it holds the rows in an array under a key, e.g. "data": [...], '
    "write that array's objects one per line: `jq -c '.data[]' in.json > in.jsonl`. Or set data.format if it "
    "is another format."
)


def _printable(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes) written as \\udXXX, so that it can be logged."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
        seen = _printable(", ".join(sorted(builder.columns_seen))) or "none"
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
            f"seen: {_printable(', '.join(sorted(builder.columns_seen))) or 'none'}. Fix data.id_column, or "
            "leave it unset (null) to derive stable ids from each row's position and content."
        )
    if data.metadata_columns and not builder.all_unparseable:
        unseen = [name for name in data.metadata_columns if name not in builder.columns_seen]
        if unseen:
            raise InputError(
                f"data.metadata_columns names {', '.join(map(repr, unseen))}, which no row of {rows} has; "
                f"columns seen: {_printable(', '.join(sorted(builder.columns_seen))) or 'none'}. Fix "
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
        f"the input has a column {_printable(name)!r}, but data.id_column is unset: the rows get ids derived "
        f"from their position and content, and {_printable(name)!r} {where}. Set "
        f"data.id_column={_printable(name)} to use its values as the rows' ids."
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
        rows = _jsonl_rows(files, endpoint_url, region)
    elif fmt == "parquet":
        rows = _parquet_rows(files, data, endpoint_url, region, seen)
    elif fmt == "hf_disk":
        rows = _saved_dataset_rows(path, data, files, endpoint_url, region, seen)
    elif fmt == "hf":
        rows = _arrow_rows(load_hub(path, data), data, path, seen)
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


# ------------------------------------------------------------------------------------------------ jsonl
def _jsonl_rows(files: list[str], endpoint_url: str | None, region: str | None) -> Iterator[tuple]:
    """(row dict | None, error | None, raw text) per non-blank line.

    Files are read a line at a time (an S3 object through a temporary file on disk), so the driver holds the
    records, not the input as well. A file that is one JSON document (an array, a pretty-printed object) or
    none of whose lines is a JSON object is not JSON Lines: InputError naming it, rather than one error row
    per line. A UTF-8 byte-order mark at the start of a file is skipped; a .gz that does not decompress is an
    InputError.
    """
    for file in files:
        with _local_copy(file, endpoint_url, region) as local:
            yield from _file_rows(file, local)


@contextlib.contextmanager
def _local_copy(file: str, endpoint_url: str | None, region: str | None) -> Iterator[str]:
    """A path on this machine holding `file`: the file itself, or an S3 object downloaded to a temporary one."""
    try:
        if not is_s3(file):
            path = Path(file).expanduser()
            if not path.is_file():
                raise StoreError(f"cannot read {file}: no such file")
            yield str(path)
            return
        bucket, key = split_s3_uri(file)
        store = S3Store(f"s3://{bucket}", S3Options(endpoint_url=endpoint_url, region=region))
        with tempfile.TemporaryDirectory(prefix="canvasflow-input-") as tmp:
            local = os.path.join(tmp, "object")
            store.download_file(key, local)
            yield local
    except StoreError as e:
        note = s3_input_note(endpoint_url) if is_s3(file) else ""
        raise InputError(f"cannot read input file: {e}{note}") from None


def _file_rows(file: str, local: str) -> Iterator[tuple]:
    name = os.path.basename(file)
    pending: list[tuple] = []  # rows before the file's first JSON object, held until one is seen
    seen_object = False
    for number, line in _lines(file, local):
        if not line.strip():
            continue
        row = _jsonl_line(line, f"{name}:{number}")
        if seen_object:
            yield row
        elif row[0] is None and not isinstance(row[1], _ObjectError):
            if not pending:
                _refuse_json_document(file, local)
            pending.append(row)
        else:
            seen_object = True
            yield from pending
            pending = []
            yield row
    if pending:
        raise InputError(
            f"{file} is not JSON Lines: none of its {len(pending)} non-blank line(s) is a JSON object "
            f"(first: {pending[0][1]}). {JSONL_HINT}"
        )


@contextlib.contextmanager
def _opened(file: str, local: str) -> Iterator[Any]:
    """The binary stream of the input file at `local` (`file` names it in errors), decompressed on the fly for
    .gz; a file compressed without the .gz name, or named .gz without being gzip, is an InputError, and so is an
    error while the body of the `with` reads the stream."""
    gz = file.lower().endswith(".gz")
    try:
        raw = open(local, "rb")  # noqa: SIM115 - closed by the with below; open errors reported apart
    except OSError as e:
        raise InputError(f"cannot read input file {file}: {e.strerror or e}") from None
    with raw:
        head = raw.read(16)
        if not head:  # an empty .jsonl.gz holds no rows, as an empty .jsonl
            yield raw
            return
        packed = next((name for name, magic in COMPRESSED_MAGIC if magic.match(head)), None)
        if not gz and packed:  # else each line would be an 'invalid UTF-8' row of binary
            fix = (
                "name it .jsonl.gz" if packed == "gzip" else "decompress it (the reader reads plain or gzip)"
            )
            raise InputError(f"{file} looks {packed}-compressed (its first bytes): {fix}")
        if gz and not head.startswith(GZIP_MAGIC):
            raise InputError(
                f"{file} is not gzip-compressed (it does not start with the gzip header); "
                "if it is plain JSON Lines, rename it without .gz"
            )
        raw.seek(0)
        try:
            yield gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        except EOFError:
            raise InputError(
                f"{file} is a truncated gzip file (the compressed data ends early, e.g. an interrupted "
                "upload or copy); copy or re-create it and check it with `gzip -t`"
            ) from None
        except (OSError, zlib.error) as e:  # gzip.BadGzipFile (CRC, length, method) is an OSError
            if not gz:
                raise InputError(f"cannot read input file {file}: {e.strerror or e}") from None
            raise InputError(
                f"{file} is a corrupt gzip file ({e}); re-create it and check it with `gzip -t`"
            ) from None


def _lines(file: str, local: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of the file at `local` (`file` names it in errors),
    decompressed on the fly for .gz, the UTF-8 byte-order mark dropped."""
    with _opened(file, local) as stream:
        for number, line in enumerate(stream, start=1):
            if number == 1 and line.startswith(UTF8_BOM):  # from some editors and Windows tools
                line = line[len(UTF8_BOM) :]
            elif number == 1:
                _refuse_other_encoding(file, line)
            yield number, line[:-1] if line.endswith(b"\n") else line


def _refuse_other_encoding(file: str, first_line: bytes) -> None:
    """InputError for a file that starts with the byte-order mark of UTF-16 or UTF-32 (what Windows PowerShell 5
    writes with `>`): else each of its lines was an 'invalid UTF-8' row, and the file 'not JSON Lines'."""
    for encoding, marks in OTHER_BOMS:
        if first_line.startswith(marks):
            raise InputError(
                f"{file} is {encoding}-encoded (it starts with a {encoding} byte-order mark), and JSON Lines is "
                f"read as UTF-8: convert it, e.g. `iconv -f {encoding} -t UTF-8 in.jsonl > out.jsonl` (in "
                "PowerShell, write files with `Out-File -Encoding utf8`)"
            )


def _text_blocks(file: str, local: str) -> Iterator[str]:
    """The text of the file at `local`, SCAN_BLOCK bytes at a time, decoded as UTF-8 (UnicodeDecodeError, a
    ValueError, where it is not), decompressed on the fly for .gz, the UTF-8 byte-order mark dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    started = False  # a first character was seen: the byte-order mark, where there is one, is behind
    with _opened(file, local) as stream:
        while block := stream.read(SCAN_BLOCK):
            text = decoder.decode(block)
            if not started and text:
                started, text = True, text.removeprefix("\ufeff")
            yield text
        yield decoder.decode(b"", final=True)


def _refuse_json_document(file: str, local: str) -> None:
    """InputError when a file whose first line is not an object is one JSON document (an array, an object
    over several lines): its lines are not rows. Only checked then, so a JSON Lines file is never re-parsed;
    the check (pipeline/data/json_document.py) stops within the first blocks of a JSON Lines file, and reads
    a document in blocks, without holding it."""
    try:
        with contextlib.closing(_text_blocks(file, local)) as blocks:  # the check may stop early: close now
            kind = document_kind(blocks)
    except InputError:  # the file cannot be read (e.g. a corrupt gzip): that, not 'not one document'
        raise
    except ValueError:  # not one document; UnicodeDecodeError is a ValueError
        return
    hint = JSONL_HINT_OBJECT if kind == "dict" else JSONL_HINT
    raise InputError(f"{file} is not JSON Lines: it is one JSON {kind}. {hint}")


class _DuplicateKeys(ValueError):
    """A JSON object of the line has a key more than once (json.loads would keep the last value silently)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of `pairs`; _DuplicateKeys naming the keys that occur more than once. Costs ~2% of a read
    (the C scanner builds the pairs list instead of the dict, and one call per object)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKeys(list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k))))
    return obj


_decode_json = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


class _ObjectError(str):
    """The error of a line that is a JSON object, unusable as a row: the file is JSON Lines all the same."""


def _jsonl_line(line: bytes, where: str) -> tuple:
    if len(line) > LONG_LINE and line.lstrip(b" \t\r")[:1] == b"[":
        # Not an object whatever it holds, and json.loads of a file-long array (json.dump's one line) took ~7x
        # its size; the file is then checked for being one JSON document (_refuse_json_document).
        size = f"{len(line) / 2**20:.0f} MiB"
        raw = line[:RAW_KEPT].decode("utf-8", errors="replace")
        return None, f"{where}: a JSONL line must be an object; this one ({size}) starts with '['", raw
    raw = line.decode("utf-8", errors="replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: invalid UTF-8 at byte {e.start}", raw
    try:
        obj = _decode_json(text)
    except json.JSONDecodeError as e:
        return None, f"{where}: malformed JSON ({e.msg} at column {e.colno})", raw
    except _DuplicateKeys as e:
        keys = ", ".join(_printable(repr(k)) for k in e.keys)
        return (
            None,
            _ObjectError(
                f"{where}: duplicate key(s) {keys} in one JSON object, so which value is meant is unclear (a "
                "JSON reader keeps only the last one); keep one value per key in the input"
            ),
            raw,
        )
    except RecursionError:
        limit = sys.getrecursionlimit()
        return (
            None,
            f"{where}: JSON nested too deeply to read (about {limit} levels at most); flatten it",
            raw,
        )
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return None, f"{where}: unreadable JSON value ({e})", raw
    if not isinstance(obj, dict):
        return None, f"{where}: a JSONL line must be an object, got {type(obj).__name__}", raw
    return obj, None, raw


# ---------------------------------------------------------------------------------------------- parquet
def _parquet_rows(
    files: list[str], data: DataConfig, endpoint_url: str | None, region: str | None, seen: set[str]
):
    """(row dict | None, error | None, raw | None) per row, a file at a time and 4,096 rows at a time (an S3
    object through a temporary file), so the driver never holds a decoded copy of the input. With
    data.metadata_columns, only the columns a record takes are read. `seen` gets every file's columns."""
    import pyarrow.parquet as pq

    for file in files:
        with _local_copy(file, endpoint_url, region) as local, open(local, "rb") as f:
            try:
                reader = pq.ParquetFile(f)
                names = reader.schema_arrow.names
                _check_columns(names, data, file)
                seen.update(names)
                name, start = os.path.basename(file), 0
                for batch in reader.iter_batches(batch_size=4096, columns=_columns_read(names, data)):
                    yield from _batch_rows(batch, lambda i, s=start, n=name: f"{n} row {s + i}")
                    start += batch.num_rows
            except InputError:
                raise
            except (pa.ArrowException, OSError, ValueError) as e:
                raise InputError(
                    f"{file} is not a readable Parquet file ({' '.join(str(e).split())}); re-export it, or set "
                    "data.format if it is another format"
                ) from None


def _check_columns(names: list[str], data: DataConfig, file: str | None = None) -> None:
    """InputError when the prompt (or messages) column or the declared id column is not among `names` (the
    columns of `file`, or of the whole input), or when a name occurs twice (a row would keep the last value)."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(
            f"{file or 'the input'} has the column(s) {_printable(', '.join(map(repr, twice)))} more than once, "
            "so which value a row means is unclear (a reader keeps only the last one); rename or drop the "
            "extra column(s) when writing it"
        )
    if data.prompt_template:
        from pipeline.data.prompts import template_fields

        missing = [name for name in template_fields(data.prompt_template) if name not in names]
        if missing:
            raise InputError(
                f"the input has no column(s) {', '.join(map(repr, missing))} of data.prompt_template"
                f"{f' in {file}' if file else ''}; its columns are: {', '.join(names)}. Fix data.prompt_template."
            )
    column = data.messages_column or data.prompt_column
    if not data.prompt_template and column not in names:
        raise InputError(
            f"the input has no column {column!r}{f' in {file}' if file else ''}; its columns are: "
            f"{', '.join(names)}. "
            f"Set data.{'messages_column' if data.messages_column else 'prompt_column'}."
        )
    if data.id_column and data.id_column not in names:
        raise InputError(
            f"data.id_column={data.id_column!r} is not a column of {file or 'the input'} ({', '.join(names)})"
        )


def _columns_read(names: list[str], data: DataConfig) -> list[str] | None:
    """The columns of `names` a record takes: with data.metadata_columns, those and the prompt's (or the
    template's) and the id's; else None, every column."""
    if data.metadata_columns is None:
        return None
    from pipeline.data.prompts import template_fields

    wanted = set(data.metadata_columns) | {data.id_column}
    if data.prompt_template:
        wanted.update(template_fields(data.prompt_template))
    else:
        wanted.add(data.messages_column or data.prompt_column)
    return [name for name in names if name in wanted]


def _arrow_rows(table, data: DataConfig, where: str, seen: set[str]) -> Iterator[tuple]:
    """(row dict | None, error | None, raw | None) per row of a loaded table (a Hugging Face dataset)."""
    _check_columns(table.column_names, data)
    seen.update(table.column_names)
    columns = _columns_read(table.column_names, data)
    if columns is not None:
        table = table.select(columns)
    start = 0
    for batch in table.to_batches(max_chunksize=4096):
        yield from _batch_rows(batch, lambda i, s=start: f"{os.path.basename(where)} row {s + i}")
        start += batch.num_rows


def _batch_rows(batch, where: Callable[[int], str]) -> Iterator[tuple]:
    try:
        rows = batch.to_pylist()
    except Exception:  # noqa: BLE001 - a value Python cannot hold (invalid UTF-8, ...): find the rows
        for offset in range(batch.num_rows):
            yield _arrow_row(batch, offset, where(offset))
    else:
        for row in rows:
            yield row, None, None


def _arrow_row(batch, offset: int, where: str) -> tuple:
    """One row, converted column by column so that a bad value becomes this row's error naming its column."""
    row, problems = {}, []
    for name, array in zip(batch.schema.names, batch.columns, strict=True):
        value = array.slice(offset, 1)
        try:
            row[name] = value.to_pylist()[0]
        except UnicodeDecodeError as e:
            problems.append(f"column {name!r} is not valid UTF-8 (byte {e.start} of the value)")
            row[name] = _lossy(value)
        except Exception as e:  # noqa: BLE001 - e.g. a timestamp out of Python's range
            problems.append(f"column {name!r} holds a value Python cannot read ({type(e).__name__}: {e})")
            row[name] = _lossy(value)
    if not problems:
        return row, None, None
    raw = json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)
    return None, f"{where}: {'; '.join(problems)}; fix the value in the input", raw


def _lossy(value) -> str:
    """A readable rendering of a value that does not convert: its bytes, invalid UTF-8 replaced."""
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(value.type)
    if binary is None:
        return f"<unreadable {value.type}>"
    return value.view(binary)[0].as_py().decode("utf-8", errors="replace")


def _saved_dataset_rows(
    path: str,
    data: DataConfig,
    files: list[str],
    endpoint_url: str | None,
    region: str | None,
    seen: set[str],
) -> Iterator[tuple]:
    with saved_dataset(path, data, files, endpoint_url, region) as table:
        yield from _arrow_rows(table, data, path, seen)
