"""Postprocess callables for tests/runner/test_postprocess_fixes.py (imported by the Ray workers by name)."""

from __future__ import annotations


def odd_results(row):
    """A list, a base column, a non-string key, or a real column, by input position."""
    kind = row["source_index"] % 4
    if kind == 0:
        return ["not", "a", "dict"]
    if kind == 1:
        return {"completion": "rewritten"}
    if kind == 2:
        return {1: "x"}
    return {"ok": True}


def int_then_str(row):
    """An int for the first six input rows (shard 0), a string for the others."""
    return {"val": 7 if row["source_index"] < 6 else "seven"}


def late_columns(row):
    """None in shard 0 for `score2` and no `late` at all there; values from shard 1 on."""
    if row["source_index"] < 6:
        return {"score2": None}
    return {"score2": 0.5, "late": "yes"}


def drop_odd(row):
    """Keeps rows at even input positions (adding no column), filters out the others."""
    return {} if row["source_index"] % 2 == 0 else None
