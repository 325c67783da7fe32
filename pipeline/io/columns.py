"""The postprocess columns of a run: one Arrow type per column for the whole run, and rows converted to it.

A column's type is fixed once per run and recorded under `_columns/` in the run (one object per column,
created only if absent, so concurrent shards agree on the first writer's type; a resumed run reads the same
objects): a type the callable declares (`fn.columns`), else the type of the first shard's non-null values
that reach storage. Every later shard converts its values to that type where that keeps the value exactly
(`convert`: an int into a double column, a number or bool into a string column, 0 or 1 into a declared bool
column); a row whose value does not convert (a string or 0.5 in a declared int64 column, 2 in a declared bool
column, a list in an inferred int64 column) becomes an error row naming the column, the value and the type.
A column that is all-null in a shard before its type is fixed is written with Arrow's null type there, and
`conform_table` brings such parts (and parts written before a column first appeared) to the run's schema when
the run is finalized (RunStore.conform_parts), so every part of a complete run has the same schema.

An inferred column (never a declared one) whose type is bool, int64 or double widens instead when a later
shard's values need a wider type, along the lattice of convert.py (int64 -> double -> string, bool ->
string): a score that is 1 in some rows and 0.5 in others is double, a label that is 3 in some rows and
"n/a" in others is string ("3", "n/a"), whichever shard commits first, with every row kept; it is the type
`infer_type` gives all the run's values together. A widening is a second object per column and target type,
`<digest>.widened.json` (to double, the name it had when int64 -> double was the only widening) or
`<digest>.widened.string.json`, also created only if absent and never removed; `read_run_columns` lets the
widest valid one replace the column's record, so the type only grows and every shard that reads the columns
after a widening converts to the wider type. A shard that read them before writes its part in the narrower
type; finalize casts such parts to the run's type like the null-typed ones (bool as "true"/"false", an int as
its digits, a double as `double_text` writes it: the text a value gets is the same whether it was converted
directly or was cast from a part written before the widening). One widening is found only at finalize
(`widen_parts`, RunStore.settle_columns): a part written in int64 before its column widened to double that
holds an int a double cannot hold exactly (beyond 2**53) widens the column to string there, as the shard
would have, had it read the double type. A resumed run reads the same objects, and a crash between a widening
and finalize leaves the widening recorded, so the resumed run's shards write the wider type and its finalize
casts the parts written before. Runs that never meet the case write the same objects as before. Nothing
else widens: lists, structs, dates, bytes and decimals mixed with other types are more likely a bug than a
wider type; they stay error rows, and which rows those are depends on which shard committed first (the error
says so: return one type, or declare a scalar column's type to choose it).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.convert import DOUBLE_INTS, convert, double_text, infer_type, short, widened_type
from pipeline.io.parts import OUTPUT_SCHEMA, TYPE_NAMES

# The columns a row has of its own (drafts: when sampler.record_drafts is on); a postprocess cannot set them.
RESERVED_COLUMNS = frozenset(OUTPUT_SCHEMA.names) | {"drafts"}

COLUMNS = "_columns/"
WIDENED = ".widened.json"  # the suffix of a column's widening object to double (see the module's docstring)
WIDENED_TO_STRING = ".widened.string.json"  # ... and to string
# Where an inferred column of one type may widen to (convert.py's lattice), the wider type last.
WIDENINGS = {
    pa.bool_(): (pa.string(),),
    pa.int64(): (pa.float64(), pa.string()),
    pa.float64(): (pa.string(),),
}
DRAFTS_TYPE = pa.list_(pa.list_(pa.string()))


@dataclass(frozen=True)
class RunColumn:
    name: str
    type: pa.DataType
    source: str  # "declared by <callable>" or "inferred from shard <n>"
    position: int | None = None  # declaration order; None for inferred columns (ordered by name after)
    # In a widening record only: the type the column had for the shard that widened it ("int64", "double",
    # "bool"); None otherwise.
    widened_from: str | None = None

    @property
    def inferred(self) -> bool:
        return self.position is None and not self.source.startswith("declared by ")

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

    def widened(self, shard: int, type_: pa.DataType = pa.float64()) -> RunColumn:
        """The widening record of this inferred column to `type_` (one of WIDENINGS[self.type])."""
        source = f"{self.source}, widened to {type_} by shard {shard}"
        return RunColumn(self.name, type_, source, None, str(self.type))


def column_key(name: str, *, widened: bool | pa.DataType = False) -> str:
    """Column names can hold any character; their objects are named by a digest. `widened`: the key of the
    column's widening to that type (True: to double)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    if widened is False:
        return f"{COLUMNS}{digest}.json"
    return f"{COLUMNS}{digest}{WIDENED_TO_STRING if widened == pa.string() else WIDENED}"


def read_run_columns(store) -> dict[str, RunColumn]:
    """Every column of the run, a widened one with its widest widening record."""
    columns: dict[str, RunColumn] = {}
    widenings: dict[str, list[RunColumn]] = {}
    for key in store.list(COLUMNS):
        column = RunColumn.from_json(store.read_text(key))
        if column.widened_from is not None:
            widenings.setdefault(column.name, []).append(column)
        else:
            columns[column.name] = column
    for name, records in widenings.items():
        base = columns.get(name)
        if base is None or not base.inferred:
            continue  # a declared column never widens
        wider = WIDENINGS.get(base.type, ())
        valid = [record for record in records if record.type in wider]
        if valid:
            columns[name] = max(valid, key=lambda record: wider.index(record.type))
    return columns


def fix_columns(store, proposed: list[RunColumn]) -> dict[str, RunColumn]:
    """Records each proposed column (or widening) unless the run already has it; returns every column of the
    run (a proposal that lost a race to another shard comes back with that shard's type)."""
    for column in proposed:
        key = column_key(column.name, widened=column.type if column.widened_from is not None else False)
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
    columns the run has no type for yet, inferred from this shard's values, or else widenings of inferred
    columns to the type that also holds this shard's values, `widened_type`). The caller records the
    proposals with `fix_columns` and calls again with the result until there are none (proposals come at most
    twice: new columns, then widenings, each to the widest type this shard's values need), so a lost race is
    converted too.
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
    widenings = []
    for name in names:
        column = run_columns.get(name)
        if column is None or not column.inferred:
            continue  # a declared column never widens
        # Every value counts, also in a row another column rejects: the widening does not depend on that.
        wider = widened_type(column.type, [r[name] for r in rows if r.get(name) is not None])
        if wider is not None:
            widenings.append(column.widened(shard, wider))
    if widenings:
        return rows, [], widenings
    kept, bad = [], []
    for row in rows:
        converted, problem = dict(row), None
        for name in names:
            column = run_columns.get(name)
            if column is None or row.get(name) is None:
                continue
            try:
                converted[name] = convert(row[name], column.type)
            except ValueError as e:
                problem = _problem(row[name], name, column, callable_name, e)
                break
        if problem is None:
            kept.append(converted)
        else:
            bad.append((row, problem))
    return kept, bad, []


def _problem(value: Any, name: str, column: RunColumn, callable_name: str | None, e: ValueError) -> str:
    """Why a row is an error row: its value for column `name` does not convert to the column's type."""
    problem = (
        f"{callable_name} returned {short(value)} ({type(value).__name__}) for column {name!r}, which is "
        f"{column.type} in this run ({column.source}): {e}. Return {column.type} values (or None) for {name!r} "
        "in every row, or declare the column's type"
    )
    declare = f"{callable_name}.columns = {{{name!r}: 'string'}}; string, bool, double or int64"
    if not column.inferred:
        return f"{problem} as another one in the callable's `columns` attribute ({declare})"
    return (
        f"{problem} as the `columns` attribute of the callable that postprocess._target_ names ({declare}): "
        "an inferred column widens only from int64 to double and from bool, int64 or double to string, so with "
        "other types mixed, which rows are error rows depends on which shard committed first"
    )


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
    """A null-typed column typed, or one written before its column was widened: ints to double (exactly:
    `widen_parts` widened a column whose ints a double does not hold to string instead), bools, ints and
    doubles to string (a double as `double_text` writes it, as `convert` does)."""
    if column.type == pa.float64() and field.type == pa.string():
        return double_text(column)
    return column.cast(field.type)


def widen_parts(
    run_columns: dict[str, RunColumn], shard: int, part_columns: list[list[str]], read_part
) -> list[RunColumn]:
    """The widenings to string that a committed part (`part_columns`: its marker's [[name, type], ...];
    `read_part()`: its table) needs: a column it holds in int64, written before the column was widened to
    double, with an int a double does not hold exactly (beyond 2**53), as a shard that read the double type
    would have widened it (an int64 part under an inferred double column is read, no other)."""
    names = [
        name
        for name, type_ in part_columns
        if type_ == "int64"
        and name in run_columns
        and run_columns[name].inferred
        and run_columns[name].type == pa.float64()
    ]
    if not names:
        return []
    table = read_part()
    widenings = []
    for name in names:
        bounds = pc.min_max(table.column(name)).as_py()
        if bounds["min"] is not None and not -DOUBLE_INTS <= bounds["min"] <= bounds["max"] <= DOUBLE_INTS:
            widenings.append(run_columns[name].widened(shard, pa.string()))
    return widenings


def schema_signature(schema: pa.Schema) -> list[list[str]]:
    """A part's columns as [[name, type], ...], recorded in its commit marker."""
    return [[f.name, str(f.type)] for f in schema]
