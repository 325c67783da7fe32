"""The postprocess columns of a run: one Arrow type per column for the whole run, and rows converted to it.

A column's type is fixed once per run and recorded under `_columns/` in the run (one object per column,
created only if absent, so concurrent shards agree on the first writer's type; a resumed run reads the same
objects): a type the callable declares (`fn.columns`), else the type of the first shard's non-null values
that reach storage. Every later shard converts its values to that type where that keeps the value exactly
(`convert`: an int into a double column, a number or bool into a string column, 0 or 1 into a bool column);
a row whose value does not convert (a string or 0.5 in an int64 column, 2 in a bool column) becomes an error
row naming the column, the value and the type. A column that is all-null in a shard before its type is fixed
is written with Arrow's null type there, and `conform_table` brings such parts (and parts written before a
column first appeared) to the run's schema when the run is finalized (RunStore.conform_parts), so every part
of a complete run has the same schema.

One exception to "fixed once": an inferred int64 column (never a declared one) that meets a float it cannot
hold (0.5, NaN, 1e30) is widened to double for the rest of the run, so a score that is 1 in some rows and 0.5
in others keeps every row whichever shard commits first (before, a shard of only ints made every later 0.5 an
error row). The widening is a second object per column, `<digest>.widened.json`, also created only if absent
and never removed; `read_run_columns` lets it replace the int64 record, so it is monotone (int64 -> double,
once) and every shard that reads the columns after it converts to double. A shard that read them before
writes its part in int64; finalize casts such parts to double like the null-typed ones (an int beyond 2**53,
which a double cannot hold exactly, is rounded there, with a warning; after the widening it is an error row,
as in any double column). A resumed run reads the same objects, and a crash between the widening and finalize
leaves the widening recorded, so the resumed run's shards write double and its finalize casts the int64
parts. Runs that never meet the case write the same objects as before. Only int64 -> double is widened:
bools, strings and lists mixed with other types are more likely a bug than a wider type (they stay error
rows; declare the column's type to choose one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.io.convert import convert, infer_type, is_float, short
from pipeline.io.parts import OUTPUT_SCHEMA, TYPE_NAMES

# The columns a row has of its own (drafts: when sampler.record_drafts is on); a postprocess cannot set them.
RESERVED_COLUMNS = frozenset(OUTPUT_SCHEMA.names) | {"drafts"}

logger = logging.getLogger(__name__)

COLUMNS = "_columns/"
WIDENED = ".widened.json"  # the suffix of a column's widening object (see the module's docstring)
DRAFTS_TYPE = pa.list_(pa.list_(pa.string()))


@dataclass(frozen=True)
class RunColumn:
    name: str
    type: pa.DataType
    source: str  # "declared by <callable>" or "inferred from shard <n>"
    position: int | None = None  # declaration order; None for inferred columns (ordered by name after)
    widened_from: str | None = None  # "int64" in a widening record (its `type` is double); None otherwise

    @property
    def inferred(self) -> bool:
        return self.position is None and not self.source.startswith("declared by ")

    @property
    def widenable(self) -> bool:
        """An inferred int64 column, not yet widened: a float it cannot hold widens it to double."""
        return self.inferred and self.widened_from is None and self.type == pa.int64()

    def to_json(self) -> str:
        schema = pa.schema([pa.field(self.name, self.type)]).serialize().to_pybytes()
        record = {
            "name": self.name,
            "type": str(self.type),
            "arrow_schema": base64.b64encode(schema).decode("ascii"),
            "source": self.source,
            "position": self.position,
        }
        if self.widened_from is not None:  # only in widening records: the others stay as they were
            record["widened_from"] = self.widened_from
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunColumn:
        d = json.loads(text)
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["arrow_schema"])))
        return cls(d["name"], schema.field(0).type, d["source"], d.get("position"), d.get("widened_from"))

    def widened(self, shard: int) -> RunColumn:
        """The widening record of this (widenable) column: double from now on."""
        return RunColumn(
            self.name, pa.float64(), f"{self.source}, widened to double by shard {shard}", None, "int64"
        )


def column_key(name: str, *, widened: bool = False) -> str:
    """Column names can hold any character; their objects are named by a digest."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{COLUMNS}{digest}{WIDENED if widened else '.json'}"


def read_run_columns(store) -> dict[str, RunColumn]:
    """Every column of the run, a widened one with its widening record (double)."""
    columns: dict[str, RunColumn] = {}
    widenings: dict[str, RunColumn] = {}
    for key in store.list(COLUMNS):
        column = RunColumn.from_json(store.read_text(key))
        (widenings if column.widened_from is not None else columns)[column.name] = column
    for name, widening in widenings.items():
        if name in columns and columns[name].widenable and widening.type == pa.float64():
            columns[name] = widening
    return columns


def fix_columns(store, proposed: list[RunColumn]) -> dict[str, RunColumn]:
    """Records each proposed column (or widening) unless the run already has it; returns every column of the
    run (a proposal that lost a race to another shard comes back with that shard's type)."""
    for column in proposed:
        key = column_key(column.name, widened=column.widened_from is not None)
        store.write_if_absent(key, column.to_json().encode("utf-8"))
    return read_run_columns(store)


def ordered(columns: dict[str, RunColumn]) -> list[RunColumn]:
    """Declared columns in declaration order, then inferred ones by name: the same order in every part."""
    return sorted(
        columns.values(),
        key=lambda c: (0, c.position, c.name) if c.position is not None else (1, 0, c.name),
    )


def declared_columns(declared: dict[str, str], callable_name: str | None) -> list[RunColumn]:
    return [
        RunColumn(name, TYPE_NAMES[t], f"declared by {callable_name}", i)
        for i, (name, t) in enumerate(declared.items())
    ]


def conform_rows(
    rows: list[dict[str, Any]],
    run_columns: dict[str, RunColumn],
    *,
    shard: int,
    callable_name: str | None,
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]], list[RunColumn]]:
    """Converts the postprocess columns of `rows` to the run's types.

    Returns (kept rows with converted values, [(row, reason)] for rows that do not convert, proposals for
    columns the run has no type for yet, inferred from this shard's values, or else widenings to double of
    inferred int64 columns that a value here is a float of and does not convert to). The caller records the
    proposals with `fix_columns` and calls again with the result until there are none (at most twice: new
    columns, then widenings), so a lost race is converted too.
    """
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in RESERVED_COLUMNS and k not in names)
    proposals = []
    for name in names:
        if name in run_columns:
            continue
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            proposals.append(RunColumn(name, infer_type(values), f"inferred from shard {shard}"))
    if proposals:
        return rows, [], proposals
    kept, bad, widenings = [], [], {}
    for row in rows:
        converted, problem = dict(row), None
        for name in names:
            column = run_columns.get(name)
            if column is None or row.get(name) is None:
                continue
            if problem is not None and not column.widenable:
                continue  # the first problem is the reason; a widening is looked for in every value
            try:
                converted[name] = convert(row[name], column.type)
            except ValueError as e:
                if column.widenable and is_float(row[name]):
                    widenings.setdefault(name, column.widened(shard))
                elif problem is None:
                    problem = (
                        f"{callable_name} returned {short(row[name])} ({type(row[name]).__name__}) for column "
                        f"{name!r}, which is {column.type} in this run ({column.source}): {e}. Return "
                        f"{column.type} values (or None) for {name!r} in every row, or declare the column's type "
                        f"as the callable's `columns` attribute, e.g. {{{name!r}: 'string'}}"
                    )
        if problem is None:
            kept.append(converted)
        else:
            bad.append((row, problem))
    if widenings:
        return rows, [], list(widenings.values())
    return kept, bad, []


def part_schema(rows: list[dict[str, Any]], run_columns: dict[str, RunColumn]) -> pa.Schema:
    """The schema of a shard's part: the base columns, drafts if recorded, every column the run has a type
    for (null where a row has no value), then columns of this shard that are all-null and have no type yet
    (Arrow's null type, replaced by the run's type when the run is finalized)."""
    schema = OUTPUT_SCHEMA
    if any("drafts" in r for r in rows):
        schema = schema.append(pa.field("drafts", DRAFTS_TYPE))
    for column in ordered(run_columns):
        schema = schema.append(pa.field(column.name, column.type))
    reserved = set(schema.names)
    untyped = sorted({k for r in rows for k in r if k not in reserved})
    for name in untyped:
        schema = schema.append(pa.field(name, pa.null()))
    return schema


def target_schema(current: pa.Schema, run_columns: dict[str, RunColumn]) -> pa.Schema:
    """What a part with schema `current` must have in a complete run."""
    schema = OUTPUT_SCHEMA
    if "drafts" in current.names:
        schema = schema.append(pa.field("drafts", DRAFTS_TYPE))
    for column in ordered(run_columns):
        schema = schema.append(pa.field(column.name, column.type))
    reserved = set(schema.names)
    for f in current:  # columns all-null in every shard so far keep the null type, after the typed ones
        if f.name not in reserved:
            schema = schema.append(f)
    return schema


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the columns of `schema`, in its order: missing ones all-null, null-typed ones cast."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            arrays.append(column if column.type == f.type else _cast(column, f))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _cast(column: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    """A null-typed column typed, or an int64 one written before its column was widened to double: an int a
    double cannot hold exactly (beyond 2**53) is rounded to the nearest one, with a warning."""
    try:
        return column.cast(field.type)
    except pa.ArrowInvalid as e:
        if not (pa.types.is_integer(column.type) and pa.types.is_floating(field.type)):
            raise
        logger.warning(
            "column %r was widened to double during the run; a part written before holds ints a double cannot "
            "hold exactly, rounded to the nearest double (%s)",
            field.name,
            str(e).splitlines()[0][:200],
        )
        return column.cast(field.type, safe=False)


def schema_signature(schema: pa.Schema) -> list[list[str]]:
    """A part's columns as [[name, type], ...], recorded in its commit marker."""
    return [[f.name, str(f.type)] for f in schema]
