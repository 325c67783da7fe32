"""Parquet files and Arrow tables (a Hugging Face dataset's) as input: (row dict | None, error | None, raw |
None) per row, 4,096 rows at a time. The prompt's, the id's and the template's columns are checked once per
file or table (InputError naming what is missing); a value Python cannot hold (invalid UTF-8, a timestamp out
of range) is its row's error, naming the column.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipeline.config.schema import DataConfig
from pipeline.data.files import InputError, local_copy
from pipeline.data.values import valid_text


def parquet_rows(
    files: list[str], data: DataConfig, endpoint_url: str | None, region: str | None, seen: set[str]
):
    """(row dict | None, error | None, raw | None) per row, a file at a time and 4,096 rows at a time (an S3
    object through a temporary file), so the driver never holds a decoded copy of the input. With
    data.metadata_columns, only the columns a record takes are read. `seen` gets every file's columns."""
    import pyarrow.parquet as pq

    for file in files:
        with local_copy(file, endpoint_url, region) as local, open(local, "rb") as f:
            try:
                reader = pq.ParquetFile(f)
                names = reader.schema_arrow.names
                _check_columns(reader.schema_arrow, data, file)
                seen.update(names)
                name, start = os.path.basename(file), 0
                uuids = _uuid_columns(reader)
                for batch in reader.iter_batches(batch_size=4096, columns=_columns_read(names, data)):
                    batch = _uuids_as_text(batch, uuids)
                    yield from _batch_rows(batch, lambda i, s=start, n=name: f"{n} row {s + i}")
                    start += batch.num_rows
            except InputError:
                raise
            except (pa.ArrowException, OSError, ValueError) as e:
                raise InputError(
                    f"{file} is not a readable Parquet file ({' '.join(str(e).split())}); re-export it, or set "
                    "data.format if it is another format"
                ) from None


def _uuid_columns(reader) -> set[str]:
    """The top-level columns that the Parquet file types as UUID (DuckDB's, Iceberg's, pyarrow's pa.uuid())
    but that pyarrow reads as 16 plain bytes (pyarrow before 18 has no UUID type), not as UUIDs."""
    columns = (reader.schema.column(i) for i in range(len(reader.schema)))
    named = {c.path for c in columns if "." not in c.path and c.logical_type.type == "UUID"}
    return {f.name for f in reader.schema_arrow if f.name in named and f.type == pa.binary(16)}


def _uuids_as_text(batch, uuids: set[str]):
    """`batch` with the `uuids` columns as their canonical text, as pyarrow's UUID type gives them (str of a
    uuid.UUID, 8-4-4-4-12 lowercase hex), so that a row's id and metadata do not depend on pyarrow's version."""
    if not uuids & set(batch.schema.names):
        return batch
    columns = [
        pa.array([None if b is None else str(uuid.UUID(bytes=b)) for b in array.to_pylist()], pa.string())
        if name in uuids
        else array
        for name, array in zip(batch.schema.names, batch.columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _check_columns(schema: pa.Schema, data: DataConfig, file: str | None = None) -> None:
    """InputError when the prompt (or messages) column or the declared id column is not among the columns of
    `schema` (of `file`, or of the whole input), when a name occurs twice (a row would keep the last value), or
    when the prompt column's type holds no text (every row would be rejected)."""
    names = schema.names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(
            f"{file or 'the input'} has the column(s) {valid_text(', '.join(map(repr, twice)))} more than once, "
            "so which value a row means is unclear (a reader keeps only the last one); rename or drop the "
            "extra column(s) when writing it"
        )
    if data.prompt_template:
        from pipeline.data.prompts import template_fields

        missing = [name for name in template_fields(data.prompt_template) if name not in names]
        if missing:
            raise InputError(
                f"the input has no column(s) {', '.join(map(repr, missing))} of data.prompt_template"
                f"{f' in {file}' if file else ''}; {_listing(names)}. Fix data.prompt_template."
            )
    column = data.messages_column or data.prompt_column
    if not data.prompt_template and column not in names:
        raise InputError(
            f"the input has no column {column!r}{f' in {file}' if file else ''}; {_listing(names)}. "
            f"Set data.{'messages_column' if data.messages_column else 'prompt_column'}."
        )
    if not data.prompt_template and not data.messages_column:
        _check_prompt_type(schema, column, file)
    if data.id_column and data.id_column not in names:
        raise InputError(
            f"data.id_column={data.id_column!r} is not a column of {file or 'the input'} ({', '.join(names)})"
        )


def _holds_text(kind: pa.DataType) -> bool:
    """Whether values of Arrow type `kind` can be prompts: text, bytes (read as UTF-8), text dictionary- or
    run-end-encoded (pandas' categoricals), text in an extension type (arrow.json: read as its text), or null
    (each row is then its own error)."""
    if isinstance(kind, pa.BaseExtensionType):
        kind = kind.storage_type
    if pa.types.is_dictionary(kind) or pa.types.is_run_end_encoded(kind):
        kind = kind.value_type
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or getattr(pa.types, "is_string_view", lambda _: False)(kind)  # pyarrow >= 16
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or getattr(pa.types, "is_binary_view", lambda _: False)(kind)
        or pa.types.is_null(kind)
    )


def _check_prompt_type(schema: pa.Schema, column: str, file: str | None) -> None:
    """InputError when the prompt column's type is not text (a label, a score, a list): rejecting every row
    one by one would hide a wrong data.prompt_column. Names the columns that hold text."""
    kind = schema.field(column).type
    if _holds_text(kind):
        return
    labels = _class_labels(schema).get(column)
    what = f"a column of type {kind}"
    if labels is not None:
        shown = ", ".join(repr(name) for name in labels[:5]) + (", ..." if len(labels) > 5 else "")
        what = f"a class-label column (integers standing for {shown})"
    if _chat_type(kind):
        raise InputError(
            f"data.prompt_column={valid_text(column)!r} holds chat messages (a list of role/content structs)"
            f"{f' in {file}' if file else ''}, not text: set data.messages_column={valid_text(column)} instead of data.prompt_column"
        )
    text = [
        f.name for f in schema if f.name != column and _holds_text(f.type) and not pa.types.is_null(f.type)
    ]
    raise InputError(
        f"data.prompt_column={valid_text(column)!r} is {what}"
        f"{f' in {file}' if file else ''}, not text, so every row would be rejected. "
        + (
            f"Columns holding text: {valid_text(', '.join(map(repr, text)))}. "
            if text
            else "No column holds text. "
        )
        + "Set data.prompt_column to the column of the prompts, or build them from columns with "
        + (
            "data.prompt_template."
            if labels is not None
            else f"data.prompt_template='... {{{valid_text(column)}}} ...'."
        )
    )


def _chat_type(kind: pa.DataType) -> bool:
    """Whether Arrow type `kind` is a list of structs with a `role` field: chat messages."""
    return (
        (pa.types.is_list(kind) or pa.types.is_large_list(kind))
        and pa.types.is_struct(kind.value_type)
        and kind.value_type.get_field_index("role") >= 0
    )


def _class_labels(schema: pa.Schema) -> dict[str, list[str]]:
    """The names of each Hugging Face ClassLabel column, from the features `datasets` keeps in the schema's
    metadata; empty when there are none (or the metadata is not what datasets writes)."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return {
            name: [str(n) for n in feature["names"]]
            for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"
        }
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}


def _listing(names: list[str]) -> str:
    """The columns `names` for a message: "its columns are: a, b", or that there are none (a Parquet file of
    an empty schema, which "its columns are: ." did not say)."""
    if not names:
        return "it has no columns at all (its schema is empty: write the file with its columns)"
    return f"its columns are: {', '.join(names)}"


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


def table_rows(table, data: DataConfig, where: str, seen: set[str]) -> Iterator[tuple]:
    """(row dict | None, error | None, raw | None) per row of a loaded table (a Hugging Face dataset)."""
    _check_columns(table.schema, data)
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
