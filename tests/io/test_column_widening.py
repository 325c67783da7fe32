"""An inferred int64 postprocess column that meets a float is widened to double for the rest of the run
(pipeline/io/columns.py): recorded once, monotone, never for a declared column, and parts written in int64
before the widening (a shard that read the columns before it, a shard committed before a crash) are cast to
double when the run is finalized. Widenings to string, and both commit orders: test_column_lattice.py. The real
job: tests/runner/test_postprocess_fixes.py."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.columns import (
    DRAFTS_TYPE,
    RunColumn,
    column_key,
    conform_rows,
    fix_columns,
    part_schema,
    read_run_columns,
)
from pipeline.io.commit import RunStore, data_key
from pipeline.io.parts import OUTPUT_SCHEMA, to_table
from pipeline.io.store import LocalStore


def _rows(shard: int, values: list) -> list[dict]:
    return [
        {"id": f"{shard}-{i}", "source_index": shard * 10 + i, "prompt": "p", "score": v}
        for i, v in enumerate(values)
    ]


def _shard(store, run_columns, shard: int, values: list, declared=()):
    """What a worker does with a shard's rows (Worker._table): propose, record, convert."""
    run_columns = fix_columns(store, list(declared)) if declared else run_columns
    for _ in range(3):
        kept, bad, proposals = conform_rows(
            _rows(shard, values), run_columns, shard=shard, callable_name="m.f"
        )
        if not proposals:
            return kept, bad, run_columns
        run_columns = fix_columns(store, proposals)
    raise AssertionError("the column types did not settle")


def test_an_inferred_int64_column_meeting_a_float_is_widened_to_double_once(tmp_path):
    store = LocalStore(tmp_path / "run")
    kept, bad, columns = _shard(store, {}, 0, [1, 1, None])
    assert not bad and str(columns["score"].type) == "int64"
    int64_record = store.read_bytes(column_key("score"))
    assert b"widened_from" not in int64_record, "a run that never widens writes the records it wrote before"

    # Shard 1 holds 0.5: it widens the column instead of rejecting the row, and converts every value to double.
    kept, bad, proposals = conform_rows(_rows(1, [2, 0.5, None]), columns, shard=1, callable_name="m.f")
    assert not bad and [(str(c.type), c.widened_from) for c in proposals] == [("double", "int64")]
    widened = fix_columns(store, proposals)
    assert widened["score"].source == "inferred from shard 0, widened to double by shard 1"
    kept, bad, proposals = conform_rows(_rows(1, [2, 0.5, None]), widened, shard=1, callable_name="m.f")
    assert not bad and not proposals
    assert [r["score"] for r in kept] == [2.0, 0.5, None] and isinstance(kept[0]["score"], float)
    assert store.read_bytes(column_key("score")) == int64_record, "the int64 record is never rewritten"
    assert store.list("_columns/") == sorted([column_key("score"), column_key("score", widened=True)])

    # A shard that read the columns before the widening proposes it again: the first record stays.
    again = fix_columns(store, [columns["score"].widened(7)])
    assert again["score"] == widened["score"] == read_run_columns(store)["score"]
    # Later shards convert to double; a list, which widens nothing, is an error row.
    kept, bad, _ = _shard(store, read_run_columns(store), 2, [3, [1]])
    assert [r["score"] for r in kept] == [3.0]
    assert [r["id"] for r, _ in bad] == ["2-1"]
    assert "which is double in this run (inferred from shard 0, widened to double by shard 1)" in bad[0][1]


@pytest.mark.parametrize("value", [0.5, math.nan, 1e30, -math.inf])
def test_every_float_an_int64_column_cannot_hold_widens_it(tmp_path, value):
    store = LocalStore(tmp_path / "run")
    _, _, columns = _shard(store, {}, 0, [1])
    kept, bad, columns = _shard(store, columns, 1, [1, value])
    assert not bad and str(columns["score"].type) == "double"
    assert kept[0]["score"] == 1.0 and (kept[1]["score"] == value or math.isnan(value))


def test_a_whole_float_widens_an_inferred_int64_column_too(tmp_path):
    """2.0 after a shard of ints stayed int64 (2), while 2.0 first made the column double (1.0 later): the
    run's type depended on which shard committed first."""
    store = LocalStore(tmp_path / "run")
    _, _, columns = _shard(store, {}, 0, [1])
    kept, bad, columns = _shard(store, columns, 1, [2.0, 3])
    assert [r["score"] for r in kept] == [2.0, 3.0] and str(columns["score"].type) == "double"
    assert store.list("_columns/") == sorted([column_key("score"), column_key("score", widened=True)])


def test_a_declared_column_or_another_type_is_never_widened(tmp_path):
    """A declared int64 column keeps its type: a float there is an error row, as before. Mixes outside the
    lattice (a list with a number or a string) stay error rows too."""
    store = LocalStore(tmp_path / "run")
    declared = [RunColumn("score", pa.int64(), "declared by m.f", 0)]
    kept, bad, columns = _shard(store, {}, 0, [1, 0.5], declared=declared)
    assert [r["id"] for r in kept] == ["0-0"] and [r["id"] for r, _ in bad] == ["0-1"]
    assert bad[0][1].startswith("m.f returned 0.5 (float) for column 'score', which is int64 in this run")
    assert "(declared by m.f)" in bad[0][1] and store.list("_columns/") == [column_key("score")]

    for first, then in [([1], [[1]]), (["x"], [[1]]), ([0.5], [{"a": 1}])]:
        store = LocalStore(tmp_path / f"run-{first}-{then}")
        _, _, columns = _shard(store, {}, 0, first)
        kept, bad, columns = _shard(store, columns, 1, then)
        assert not kept and len(bad) == 1 and columns["score"].widened_from is None, (first, then)
        assert store.list("_columns/") == [column_key("score")]


def test_a_row_rejected_for_another_column_still_widens(tmp_path):
    """Whether the column widens does not depend on the order of the columns in a row."""
    store = LocalStore(tmp_path / "run")
    rows = [{"id": "0", "source_index": 0, "prompt": "p", "a": 1, "b": 1}]
    columns = fix_columns(store, conform_rows(rows, {}, shard=0, callable_name="m.f")[2])
    rows = [{"id": "1", "source_index": 1, "prompt": "p", "a": [1], "b": 0.5}]
    _, _, proposals = conform_rows(rows, columns, shard=1, callable_name="m.f")
    assert [(c.name, str(c.type)) for c in proposals] == [("b", "double")]
    columns = fix_columns(store, proposals)
    kept, bad, proposals = conform_rows(rows, columns, shard=1, callable_name="m.f")
    assert not kept and not proposals and "for column 'a', which is int64" in bad[0][1]


def _commit(run: RunStore, shard: int, kept: list[dict], columns) -> None:
    table = to_table(kept, part_schema(kept, columns))
    run.commit_shard(shard, table, [], compression="zstd", stats={}, worker="w0", attempt=1)


def test_parts_written_in_int64_before_the_widening_are_double_after_finalize(tmp_path):
    """Shard 0 commits in int64; shard 2 reads the columns (int64), then shard 1 widens them and commits in
    double, then shard 2 commits in int64 under the old type. A resumed driver (a new RunStore) finalizes: every
    part is double with its values, and every marker describes its part (no shard is regenerated). (A part
    holding an int a double cannot hold widens the column to string instead: test_column_lattice.py.)"""
    store = LocalStore(tmp_path / "run")
    run = RunStore(store, "r")
    kept0, _, columns = _shard(store, {}, 0, [1, 2])
    _commit(run, 0, kept0, columns)
    stale = read_run_columns(store)  # shard 2's read, before the widening
    kept1, _, widened = _shard(store, stale, 1, [1, 0.5])
    _commit(run, 1, kept1, widened)
    kept2, bad2, _ = conform_rows(_rows(2, [3, 2**53]), stale, shard=2, callable_name="m.f")
    assert not bad2
    _commit(run, 2, kept2, stale)
    types = {s: dict(c.columns)["score"] for s, c in run.committed().items()}
    assert types == {0: "int64", 1: "double", 2: "int64"}

    resumed = RunStore(store, "r")
    commits = resumed.committed()
    assert resumed.conform_parts(commits) == [0, 2]
    values = {}
    for shard in (0, 1, 2):
        table = pq.read_table(tmp_path / "run" / data_key(shard))
        assert table.schema.field("score").type == pa.float64(), shard
        values[shard] = table.column("score").to_pylist()
    assert values == {0: [1.0, 2.0], 1: [1.0, 0.5], 2: [3.0, float(2**53)]}
    assert str(read_run_columns(store)["score"].type) == "double"
    assert resumed.verify(resumed.committed()) == [], "each rewritten part's marker was rewritten with it"
    assert {dict(c.columns)["score"] for c in resumed.committed().values()} == {"double"}
    assert resumed.conform_parts(resumed.committed()) == []


@pytest.mark.parametrize("drafts", [False, True])
def test_the_empty_part_of_a_run_without_output_rows_has_the_columns_a_part_with_rows_has(tmp_path, drafts):
    """A run whose every row was rejected gets one data part without rows at finalize; with
    sampler.record_drafts its parts with rows have a `drafts` column, which the empty part lacked."""
    store = LocalStore(tmp_path / "run")
    run = RunStore(store, "r")
    error = {"id": "a", "stage": "tokenize", "error": "the prompt has no tokens"}
    run.commit_shard(
        0, to_table([], OUTPUT_SCHEMA), [error], compression="zstd", stats={}, worker="w", attempt=1
    )
    manifest = {"parts": [], "compression": "zstd"}
    run.finalize(run.committed(), manifest, {}, "card", drafts=drafts)
    schema = pq.read_schema(tmp_path / "run" / data_key(0))
    expected = OUTPUT_SCHEMA.append(pa.field("drafts", DRAFTS_TYPE)) if drafts else OUTPUT_SCHEMA
    assert schema.remove_metadata() == expected
    assert [p["data_key"] for p in manifest["parts"]] == [data_key(0)]
