"""Reads a prompt dataset into records, one per input row, bad rows included.

Sources: JSONL and Parquet files or directories of them (local or s3://), a Hugging Face dataset saved with
`save_to_disk`, `datasets.load_dataset` arguments (format=hf), and the shipped prompts. Every input row (or
non-blank JSONL line) yields exactly one record; a row that cannot be used carries an `error` and goes to
the run's errors/ instead of the output. Problems with the input as a whole (unreadable file, missing prompt
column) raise InputError before any GPU work.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config.schema import BUILTIN_PROMPTS, DataConfig
from pipeline.data.records import RecordBuilder, RecordTable
from pipeline.io.store import StoreError, is_s3, open_store, read_uri, split_s3_uri

logger = logging.getLogger(__name__)

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "prompts.jsonl"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
JSONL_HINT = (
    'Each line must hold one JSON object, e.g. {"prompt": "..."}; convert a JSON array with '
    "`jq -c '.[]' in.json > in.jsonl`, or set data.format if it is another format."
)


class InputError(ValueError):
    """The input as a whole is unusable; the message names the file or column."""


def _printable(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes) written as \\udXXX, so that it can be logged."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def resolve_path(path: str) -> str:
    return str(SHIPPED_PROMPTS) if path == BUILTIN_PROMPTS else path


def detect_format(path: str, requested: str, files: list[str]) -> str:
    if requested != "auto":
        return requested
    if path.startswith("hf:"):
        return "hf"
    if (
        not is_s3(path)
        and Path(path).is_dir()
        and any(
            (Path(path) / marker).exists()
            for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
    ):
        return "hf_disk"
    suffixes = {_suffix(f) for f in files}
    if suffixes and suffixes <= {"jsonl"}:
        return "jsonl"
    if suffixes and suffixes <= {"parquet"}:
        return "parquet"
    raise InputError(
        f"data.path={path!r}: cannot tell the format from {sorted(suffixes) or 'no data files'}; "
        "set data.format to jsonl, parquet, hf_disk or hf"
    )


def _suffix(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_files(path: str, *, endpoint_url: str | None, region: str | None) -> list[str]:
    """The data files at `path`: the file itself, or the JSONL/Parquet files under a directory/prefix."""
    if path.startswith("hf:"):
        return []
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        store = open_store(f"s3://{bucket}", endpoint_url=endpoint_url, region=region)
        try:
            keys = store.list(key)
        except StoreError as e:
            raise InputError(f"data.path={path!r} cannot be listed: {e}") from None
        if key in keys:
            return [path]
        # A prefix is a folder: s3://b/in/prompts reads in/prompts/..., never in/prompts-old/ or
        # in/prompts_backup.jsonl (S3 prefixes match any key that starts with them).
        folder = f"{key}/" if key else ""
        files = [f"s3://{bucket}/{k}" for k in keys if k.startswith(folder) and _suffix(k)]
        if not files:
            siblings = sorted({k[len(key) :].split("/")[0] for k in keys if not k.startswith(folder)})
            hint = (
                f" (keys next to it start with {', '.join(repr(key + s) for s in siblings[:3])}: "
                "give the exact object or folder)"
                if siblings
                else ""
            )
            raise InputError(
                f"data.path={path!r}: no .jsonl or .parquet objects under s3://{bucket}/{folder}{hint}"
            )
        return files
    local = Path(path).expanduser()
    if local.is_file():
        return [str(local)]
    if local.is_dir():
        files = sorted(str(p) for p in local.rglob("*") if p.is_file() and _suffix(p.name))
        return files
    raise InputError(f"data.path={path!r} does not exist")


def read_input(
    data: DataConfig, *, endpoint_url: str | None = None, region: str | None = None
) -> RecordTable:
    """All records of the input, in input order, with a fingerprint of their content."""
    path = resolve_path(data.path)
    files = list_files(path, endpoint_url=endpoint_url, region=region)
    fmt = detect_format(path, data.format, files)
    builder = RecordBuilder(data)
    if fmt == "jsonl":
        rows = _jsonl_rows(files, endpoint_url, region)
    elif fmt == "parquet":
        table, sources = _read_parquet(files, endpoint_url, region)
        rows = _arrow_rows(table, data, sources)
    elif fmt == "hf_disk":
        table = _load_hf_disk(path, data)
        rows = _arrow_rows(table, data, [(path, table.num_rows)])
    elif fmt == "hf":
        table = _load_hf(path, data)
        rows = _arrow_rows(table, data, [(path, table.num_rows)])
    else:
        raise InputError(f"data.format={fmt!r} is not one of jsonl, parquet, hf_disk, hf")
    for index, (row, error, raw) in enumerate(rows):
        if data.limit is not None and index >= data.limit:
            break
        builder.add(index, row, error, raw)
    table = builder.finish()
    if table.num_rows == 0:
        raise InputError(f"data.path={data.path!r} holds no rows")
    if builder.rows_with_prompt == 0 and not builder.all_unparseable:
        column = data.messages_column or data.prompt_column
        raise InputError(
            f"no row of {data.path!r} has the prompt column {column!r}; columns seen: "
            f"{_printable(', '.join(sorted(builder.columns_seen))) or 'none'}. "
            "Set data.prompt_column (or data.messages_column)."
        )
    return RecordTable(table=table, fingerprint=builder.fingerprint(), files=files, format=fmt)


# ------------------------------------------------------------------------------------------------ jsonl
def _jsonl_rows(files: list[str], endpoint_url: str | None, region: str | None) -> Iterator[tuple]:
    """(row dict | None, error | None, raw text) per non-blank line.

    A file that is one JSON document (an array, a pretty-printed object) or none of whose lines is a JSON
    object is not JSON Lines: InputError naming it, rather than one error row per line. A UTF-8 byte-order
    mark at the start of a file is skipped; a .gz that does not decompress is an InputError.
    """
    for file in files:
        try:
            payload = read_uri(file, endpoint_url=endpoint_url, region=region)
        except StoreError as e:
            raise InputError(f"cannot read input file: {e}") from None
        if file.lower().endswith(".gz"):
            payload = _gunzip(file, payload)
        if payload.startswith(UTF8_BOM):  # written by some editors and Windows tools; not part of the data
            payload = payload[len(UTF8_BOM) :]
        name = os.path.basename(file)
        pending: list[tuple] = []  # rows before the file's first JSON object, held until one is seen
        seen_object = False
        for number, line in enumerate(payload.split(b"\n"), start=1):
            if not line.strip():
                continue
            row = _jsonl_line(line, f"{name}:{number}")
            if seen_object:
                yield row
            elif row[0] is None:
                if not pending:
                    _refuse_json_document(file, payload)
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


def _refuse_json_document(file: str, payload: bytes) -> None:
    """InputError when a file whose first line is not an object is one JSON document (an array, an object
    over several lines): its lines are not rows. Only checked then, so a JSON Lines file is never re-parsed."""
    try:
        document = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return
    raise InputError(f"{file} is not JSON Lines: it is one JSON {type(document).__name__}. {JSONL_HINT}")


def _jsonl_line(line: bytes, where: str) -> tuple:
    raw = line.decode("utf-8", errors="replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: invalid UTF-8 at byte {e.start}", raw
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"{where}: malformed JSON ({e.msg} at column {e.colno})", raw
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


def _gunzip(file: str, payload: bytes) -> bytes:
    """The decompressed bytes, or InputError naming the file: a corrupt .gz is unusable as a whole."""
    import gzip
    import zlib

    if not payload.startswith(GZIP_MAGIC):
        raise InputError(
            f"{file} is not gzip-compressed (it does not start with the gzip header); "
            "if it is plain JSON Lines, rename it without .gz"
        )
    try:
        return gzip.decompress(payload)
    except EOFError:
        raise InputError(
            f"{file} is a truncated gzip file (the compressed data ends early, e.g. an interrupted "
            "upload or copy); copy or re-create it and check it with `gzip -t`"
        ) from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile (CRC, length, method) is an OSError
        raise InputError(
            f"{file} is a corrupt gzip file ({e}); re-create it and check it with `gzip -t`"
        ) from None


# ---------------------------------------------------------------------------------------------- parquet
def _read_parquet(files: list[str], endpoint_url: str | None, region: str | None):
    """(one table of all files, [(file, row count)] in order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        try:
            payload = read_uri(file, endpoint_url=endpoint_url, region=region)
            tables.append(pq.read_table(io.BytesIO(payload)))
        except StoreError as e:
            raise InputError(f"cannot read input file: {e}") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(
                f"{file} is not a readable Parquet file ({' '.join(str(e).split())}); re-export it, or set "
                "data.format if it is another format"
            ) from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise InputError(f"the Parquet files under the input have incompatible schemas: {e}") from None
    return table, [(file, t.num_rows) for file, t in zip(files, tables, strict=True)]


def _arrow_rows(table, data: DataConfig, sources: list[tuple[str, int]]) -> Iterator[tuple]:
    """(row dict | None, error | None, raw | None) per table row; `sources` names the file of each row."""
    column = data.messages_column or data.prompt_column
    if column not in table.column_names:
        raise InputError(
            f"the input has no column {column!r}; its columns are: {', '.join(table.column_names)}. "
            f"Set data.{'messages_column' if data.messages_column else 'prompt_column'}."
        )
    if data.id_column and data.id_column not in table.column_names:
        raise InputError(
            f"data.id_column={data.id_column!r} is not a column of the input ({', '.join(table.column_names)})"
        )
    start = 0
    for batch in table.to_batches(max_chunksize=4096):
        try:
            rows = batch.to_pylist()
        except Exception:  # noqa: BLE001 - a value Python cannot hold (invalid UTF-8, ...): find the rows
            for offset in range(batch.num_rows):
                yield _arrow_row(batch, offset, _where(sources, start + offset))
        else:
            for row in rows:
                yield row, None, None
        start += batch.num_rows


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
    import pyarrow as pa

    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(value.type)
    if binary is None:
        return f"<unreadable {value.type}>"
    return value.view(binary)[0].as_py().decode("utf-8", errors="replace")


def _where(sources: list[tuple[str, int]], index: int) -> str:
    """'file row N' (N from 0 within that file) for a row of the concatenated input."""
    for file, rows in sources:
        if index < rows:
            return f"{os.path.basename(file)} row {index}"
        index -= rows
    return f"input row {index}"


# ------------------------------------------------------------------------------------ hugging face datasets
def _select_split(dataset: Any, data: DataConfig, where: str):
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if data.split is None:
            if len(dataset) == 1:
                return next(iter(dataset.values()))
            raise InputError(f"{where} has splits {list(dataset)}; choose one with data.split")
        if data.split not in dataset:
            raise InputError(f"data.split={data.split!r} is not a split of {where} ({list(dataset)})")
        return dataset[data.split]
    return dataset


def _load_hf_disk(path: str, data: DataConfig):
    if is_s3(path):
        raise InputError(
            "data.format=hf_disk reads local directories; copy the dataset locally or export Parquet"
        )
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - surfaced with the path
        raise InputError(f"cannot load the saved dataset at {path}: {e}") from None
    return _select_split(dataset, data, path).data.table


def _load_hf(path: str, data: DataConfig):
    from datasets import load_dataset

    kwargs = dict(data.hf_kwargs)
    if path.startswith("hf:"):
        kwargs.setdefault("path", path[len("hf:") :])
    if data.split is not None:
        kwargs.setdefault("split", data.split)
    if "path" not in kwargs:
        raise InputError("data.format=hf needs data.path=hf:<name> or data.hf_kwargs.path")
    try:
        dataset = load_dataset(**kwargs)
    except Exception as e:  # noqa: BLE001 - surfaced with the argument names (values may be secrets)
        raise InputError(
            f"datasets.load_dataset failed for data.path={data.path!r} (arguments: {', '.join(sorted(kwargs))}): "
            f"{_redact(str(e), kwargs)}"
        ) from None
    return _select_split(dataset, data, str(kwargs["path"])).data.table


def _redact(message: str, kwargs: dict[str, Any]) -> str:
    """`message` without the values of the arguments other than path, split and name (a token, a secret)."""
    for name, value in kwargs.items():
        if name not in ("path", "split", "name") and isinstance(value, str) and len(value) >= 4:
            message = message.replace(value, "***")
    return message
