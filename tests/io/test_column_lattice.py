"""An inferred postprocess column whose values mix bool, int, float and str gets the same type and values
whichever shard commits first (pipeline/io/convert.py's lattice: int64 -> double -> string, bool -> string),
the type one shard holding all the values gives it. Before, the first shard's type won: ints then "x" made
"x" an error row, "x" then ints wrote the ints as text; True then 1 wrote 1 as True, 1 then True made True an
error row. Each run here commits real Parquet parts (on the local filesystem and on SeaweedFS), finalizes, and
reads the parts back. The real job: tests/runner/test_postprocess_fixes.py."""

from __future__ import annotations

import io
import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.columns import (
    RunColumn,
    column_key,
    conform_rows,
    fix_columns,
    part_schema,
    read_run_columns,
)
from pipeline.io.commit import RunStore
from pipeline.io.convert import convert, infer_type
from pipeline.io.parts import TYPE_NAMES, to_table
from pipeline.io.store import LocalStore, Store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def new_store(request: pytest.FixtureRequest, tmp_path):
    """A function giving a fresh, empty run location on the backend: one per run of a test."""
    counter = itertools.count()
    if request.param == "local":
        return lambda: LocalStore(tmp_path / f"run-{next(counter)}")
    bucket = request.getfixturevalue("s3_bucket")
    return lambda: bucket.store(f"runs/run-{next(counter)}")


def _rows(shard: int, values: list, first: int = 0) -> list[dict]:
    return [
        {"id": f"{shard}-{first + i}", "source_index": shard * 100 + first + i, "prompt": "p", "score": v}
        for i, v in enumerate(values)
    ]


def _conform(store: Store, rows: list[dict], shard: int, run_columns=None, declared=()):
    """What a worker does with a shard's rows (Worker._table): propose, record, convert."""
    run_columns = fix_columns(store, list(declared)) if run_columns is None else run_columns
    for _ in range(3):
        kept, bad, proposals = conform_rows(rows, run_columns, shard=shard, callable_name="m.f")
        if not proposals:
            return kept, bad, run_columns
        run_columns = fix_columns(store, proposals)
    raise AssertionError("the column types did not settle")


def _commit(run: RunStore, shard: int, kept: list[dict], bad: list, run_columns) -> None:
    errors = [
        {
            "id": r["id"],
            "source_index": r["source_index"],
            "stage": "postprocess",
            "reason": why,
            "run_id": "r",
        }
        for r, why in bad
    ]
    table = to_table(kept, part_schema(kept, run_columns))
    run.commit_shard(shard, table, errors, compression="zstd", stats={}, worker="w0", attempt=1)


def _finalize_and_read(store: Store) -> tuple[pa.Table, list[str]]:
    """Finalizes the run (a new RunStore, as a resumed driver) and reads its data and error parts back."""
    run = RunStore(store, "r")
    run.finalize(run.committed(), {"parts": [], "compression": "zstd"}, {}, "card")
    parts = [pq.read_table(io.BytesIO(store.read_bytes(k))) for k in store.list("data/")]
    assert len({p.schema for p in parts}) == 1, [p.schema for p in parts]  # one schema in every part
    errors = [pq.read_table(io.BytesIO(store.read_bytes(k))) for k in store.list("errors/")]
    reasons = [r for e in errors for r in e.column("reason").to_pylist()]
    return pa.concat_tables(parts), reasons


def _run(store: Store, shards: dict[int, list], order: list[int]) -> tuple[str, dict, list[str]]:
    """Commits `shards` ({shard: values}) in `order`, each shard reading the columns as they are then; returns
    the score column's type and {id: value} as read back, and the error rows' reasons."""
    run = RunStore(store, "r")
    for shard in order:
        kept, bad, run_columns = _conform(store, _rows(shard, shards[shard]), shard)
        _commit(run, shard, kept, bad, run_columns)
    table, reasons = _finalize_and_read(store)
    values = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist(), strict=True))
    return str(table.schema.field("score").type), values, reasons


# ({shard: values}, the run's type, {shard: the values read back}): every commit order gives these, and so
# does one shard holding every value.
CASES = {
    "int-string": ({0: [1, -2], 1: ["x"]}, "string", {0: ["1", "-2"], 1: ["x"]}),
    "bool-int": ({0: [True, False], 1: [1, 0]}, "string", {0: ["true", "false"], 1: ["1", "0"]}),
    "bool-double": ({0: [True], 1: [0.5]}, "string", {0: ["true"], 1: ["0.5"]}),
    "double-string": ({0: [0.5, 1.0, -0.0], 1: ["x"]}, "string", {0: ["0.5", "1", "-0"], 1: ["x"]}),
    "int-whole-float": ({0: [1], 1: [2.0]}, "double", {0: [1.0], 1: [2.0]}),
    "int-beyond-int64": (
        {0: [2**63, -(2**70)], 1: [1]},
        "string",
        {0: ["9223372036854775808", "-1180591620717411303424"], 1: ["1"]},
    ),
    "int-beyond-2**53-double": (
        {0: [2**53 + 1], 1: [0.5]},
        "string",
        {0: ["9007199254740993"], 1: ["0.5"]},
    ),
    "int-double-string": (  # 10**15 via a double part is "1000000000000000" as it is directly (not "1e+15")
        {0: [10**15, 3], 1: [0.25], 2: ["x"]},
        "string",
        {0: ["1000000000000000", "3"], 1: ["0.25"], 2: ["x"]},
    ),
    "bool-int-double-none": (
        {0: [True, None], 1: [None, 7], 2: [2.5]},
        "string",
        {0: ["true", None], 1: [None, "7"], 2: ["2.5"]},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_an_inferred_column_has_the_same_type_and_values_whichever_shard_commits_first(new_store, case):
    shards, type_, by_shard = CASES[case]
    expected = {f"{s}-{i}": v for s, values in by_shard.items() for i, v in enumerate(values)}
    for order in itertools.permutations(shards):
        assert _run(new_store(), shards, list(order)) == (type_, expected, []), order

    # One shard holding every value infers that type, and writes those values.
    store = new_store()
    rows = [row for s, values in shards.items() for row in _rows(s, values)]
    run = RunStore(store, "r")
    kept, bad, run_columns = _conform(store, rows, 0)
    assert str(run_columns["score"].type) == type_ and not bad
    _commit(run, 0, kept, bad, run_columns)
    table, _ = _finalize_and_read(store)
    assert (
        dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist(), strict=True)) == expected
    )


def test_shards_that_read_the_columns_before_each_widening_are_cast_to_the_widest_at_finalize(new_store):
    """Shard 2 reads the columns while they are int64 and shard 4 while they are double; meanwhile shard 1
    widens them to double and shard 3 to string. Both commit in the type they read; finalize casts their parts
    to string, with the text a value gets directly (so the run equals one committed in another order)."""
    store = new_store()
    run = RunStore(store, "r")
    shards = {0: [1], 1: [0.5], 2: [10**15], 3: ["x"], 4: [7, 0.25], 5: [False]}
    kept, bad, columns = _conform(store, _rows(0, shards[0]), 0)
    _commit(run, 0, kept, bad, columns)
    as_int64 = read_run_columns(store)
    kept, bad, columns = _conform(store, _rows(1, shards[1]), 1)
    _commit(run, 1, kept, bad, columns)
    as_double = read_run_columns(store)
    kept, bad, columns = _conform(store, _rows(3, shards[3]), 3)
    _commit(run, 3, kept, bad, columns)
    assert [str(c["score"].type) for c in (as_int64, as_double, columns)] == ["int64", "double", "string"]
    source = "inferred from shard 0, widened to double by shard 1, widened to string by shard 3"
    assert columns["score"].source == source
    kept, bad, _ = _conform(store, _rows(2, shards[2]), 2, run_columns=as_int64)
    _commit(run, 2, kept, bad, as_int64)
    kept, bad, _ = _conform(store, _rows(4, shards[4]), 4, run_columns=as_double)
    assert not bad and [r["score"] for r in kept] == [7.0, 0.25]
    _commit(run, 4, kept, bad, as_double)
    # Shard 5 read int64 too: its False widens to string, which shard 3 recorded first.
    kept, bad, columns = _conform(store, _rows(5, shards[5]), 5, run_columns=as_int64)
    assert columns["score"].source == source and [r["score"] for r in kept] == ["false"]
    _commit(run, 5, kept, bad, columns)
    types = {s: dict(c.columns)["score"] for s, c in run.committed().items()}
    assert types == {0: "int64", 1: "double", 2: "int64", 3: "string", 4: "double", 5: "string"}

    table, reasons = _finalize_and_read(store)
    assert not reasons and table.schema.field("score").type == pa.string()
    values = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist(), strict=True))
    expected = {"0-0": "1", "1-0": "0.5", "2-0": "1000000000000000", "3-0": "x", "4-0": "7", "4-1": "0.25"}
    assert values == {**expected, "5-0": "false"}
    assert _run(new_store(), shards, [5, 3, 4, 2, 1, 0]) == ("string", values, [])
    run = RunStore(store, "r")
    assert run.verify(run.committed()) == [] and run.conform_parts(run.committed()) == []


def test_an_int_a_double_cannot_hold_in_a_part_written_before_the_widening_widens_to_string_at_finalize(
    new_store,
):
    """Shard 0 commits 2**53 + 1 in int64, then shard 1 widens the column to double: the int64 part cannot be
    cast exactly. Finalize records the widening to string first (a crash after it leaves it recorded, and the
    resumed finalize casts every part to string), so the run is what the other commit order gives."""
    store = new_store()
    run = RunStore(store, "r")
    for shard, values in [(0, [2**53 + 1, 2]), (1, [0.5])]:
        kept, bad, columns = _conform(store, _rows(shard, values), shard)
        _commit(run, shard, kept, bad, columns)
    assert str(columns["score"].type) == "double"
    settled = RunStore(store, "r").settle_columns(run.committed())  # then the driver "crashes"
    assert str(settled["score"].type) == "string" and settled == read_run_columns(store)
    assert settled["score"].source == (
        "inferred from shard 0, widened to double by shard 1, widened to string by shard 0"
    )
    assert column_key("score", widened=pa.string()) in store.list("_columns/")
    table, reasons = _finalize_and_read(store)
    assert not reasons and table.schema.field("score").type == pa.string()
    assert table.column("score").to_pylist() == ["9007199254740993", "2", "0.5"]


@pytest.mark.parametrize(
    ("first", "then"),
    [([1], [[1]]), ([[1]], [1]), (["x"], [{"a": 1}]), ([[1]], [["x"]])],
    ids=["int-list", "list-int", "string-struct", "list-list"],
)
def test_other_mixed_types_are_error_rows_that_say_to_declare_the_type(tmp_path, first, then):
    """Lists, structs and the like do not widen: the later shard's values are error rows, and the reason says
    that which rows those are depends on the commit order, and where a column's type is declared."""
    store = LocalStore(tmp_path / "run")
    _, _, columns = _conform(store, _rows(0, first), 0)
    kept, bad, columns = _conform(store, _rows(1, then), 1)
    assert not kept and len(bad) == 1 and store.list("_columns/") == [column_key("score")]
    reason = bad[0][1]
    assert reason.startswith(
        f"m.f returned {then[0]!r} ({type(then[0]).__name__}) for column 'score', which is"
    )
    assert "(inferred from shard 0)" in reason
    assert (
        "declare the column's type as the `columns` attribute of the callable that postprocess._target_"
        in reason
    )
    assert "m.f.columns = {'score': 'string'}" in reason
    assert "depends on which shard committed first" in reason


def test_declared_columns_keep_their_type_and_convert_only_exactly(tmp_path):
    """A declared column never widens: a string in a declared int64 column, 2**53 + 1 in a declared double one,
    a float in a declared int64 one are error rows; 0 and 1 are a declared bool column's False and True, 2.0
    a declared int64 column's 2. An int beyond int64 is its decimal text in a declared string column (it was an
    error row: Arrow holds no such int)."""
    cases = [
        ("int64", [1, 2.0, "x", 0.5], [1, 2], ["2", "3"]),
        ("double", [1, 0.5, 2**53 + 1, "x"], [1.0, 0.5], ["2", "3"]),
        ("bool", [True, 0, 1, 2, "x"], [True, False, True], ["3", "4"]),
        (
            "string",
            [2**63, -(2**64), 1e15, True, [1]],
            ["9223372036854775808", "-18446744073709551616", "1000000000000000", "true"],
            ["4"],
        ),
    ]
    for type_name, values, kept_values, bad_ids in cases:
        store = LocalStore(tmp_path / type_name)
        declared = [RunColumn("score", TYPE_NAMES[type_name], "declared by m.f", 0)]
        rows = [{"id": str(i), "source_index": i, "prompt": "p", "score": v} for i, v in enumerate(values)]
        kept, bad, columns = _conform(store, rows, 0, declared=declared)
        assert [r["score"] for r in kept] == kept_values, type_name
        assert [r["id"] for r, _ in bad] == bad_ids, type_name
        assert str(columns["score"].type) == type_name and store.list("_columns/") == [column_key("score")]
        assert "(declared by m.f)" in bad[0][1] and "declare the column's type as another one" in bad[0][1]
    assert convert(1e15, pa.string()) == "1000000000000000" and convert(1e16, pa.string()) == "1e+16"


def test_one_shards_values_infer_the_least_type_holding_them_all():
    assert [
        str(infer_type(values))
        for values in (
            [True],
            [1, 2**62],
            [1, 2.0],
            [2**53, 0.5],
            [2**53 + 1, 0.5],
            [True, 1],
            [1, "x"],
            [2**63],
            [[1], [0.5]],
            [[1], 1],
        )
    ] == ["bool", "int64", "double", "double", "string", "string", "string", "string", "list<item: double>",
          "list<item: int64>"]  # fmt: skip
