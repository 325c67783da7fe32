"""Postprocess callables for tests/runner/test_postprocess_fixes.py (imported by the Ray workers by name)."""

from __future__ import annotations

import os
import time


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


def by_prompt(row, low, high):
    """`val` is `low` for the prompts of input rows 0-5 ("Add: 0+0" to "Add: 5+10"), `high` for the others,
    wherever they are in the input: an input in reverse order commits `high` first."""
    n = int(row["prompt"].removeprefix("Add: ").split("+")[0])
    return {"val": low if n < 6 else high}


def late_columns(row):
    """None in shard 0 for `score2` and no `late` at all there; values from shard 1 on."""
    if row["source_index"] < 6:
        return {"score2": None}
    return {"score2": 0.5, "late": "yes"}


def drop_odd(row):
    """Keeps rows at even input positions (adding no column), filters out the others."""
    return {} if row["source_index"] % 2 == 0 else None


def age_file(row, path):
    """Keeps the row (adding no column) and makes the file `path`, if it is still there, an hour old: time
    passing during a run, for tests/runner/test_run_lock.py."""
    if os.path.exists(path):
        old = time.time() - 3600
        os.utime(path, (old, old))
    return {}


def by_completion(row):
    """Completions 0 and 2 get a score, 1 is filtered out, 3 gets a score of the wrong type (an error row)."""
    return [{"score": 0.5}, None, {"score": 0.25}, {"score": "high"}][row["completion_index"]]


by_completion.columns = {"score": "double"}


def numbers_as_bools(row):
    """A checker's verdict as a number for a declared bool column: 0, 1, 2, 0.5 by input position."""
    return {"ok": [0, 1, 2, 0.5][row["source_index"] % 4]}


numbers_as_bools.columns = {"ok": "bool"}


def sets_drafts(row):
    """A column the row has only when sampler.record_drafts is on."""
    return {"drafts": "x", "ok": True}


def delete_file(row, path, from_index):
    """Keeps the row (adding no column) and, from input row `from_index` on, deletes the file `path`: a part
    removed by something else after its shard committed, for tests/runner/test_job.py."""
    if row["source_index"] >= from_index and os.path.exists(path):
        os.remove(path)
    return {}


def keep_filter_raise(row):
    """Keeps completion 0, filters out completion 1, raises on completion 2."""
    if row["completion_index"] == 2:
        raise ValueError("bad completion")
    return {} if row["completion_index"] == 0 else None


def calls_an_api(row, endpoint, api_key, headers):
    """Asks an HTTP API (requests, the key in the query and a header) about odd rows: with no server at
    `endpoint`, requests raises naming the URL with its ?key=."""
    if row["source_index"] % 2 == 0:
        return {"checked": True}
    import requests

    requests.get(endpoint, params={"key": api_key}, headers=headers, timeout=5)
    return {"checked": True}


def reads_its_key_from_the_environment(row):
    """Raises naming the API key it read from the environment itself, as an HTTP client's error would."""
    import os

    raise RuntimeError(f"401 for https://api.example/v1?key={os.environ['SCORER_API_KEY']}")


def never_set(row):
    """A score for every row, and a `note` that is None in every row (no type is ever inferred for it)."""
    return {"score": 0.5, "note": None}


def int_then_half(row, path=None, from_index=None):
    """`score` 1 in shard 0 (ints only), 1 or 0.5 from shard 1 on (0.5 at odd input positions); from input row
    `from_index` on, deletes the file `path` if it is still there (a part lost before the run is finalized)."""
    if path is not None and row["source_index"] >= from_index and os.path.exists(path):
        os.remove(path)
    return {"score": 1 if row["source_index"] < 6 or row["source_index"] % 2 == 0 else 0.5}


def reject_or_filter(row):
    """Rejects the rows at input positions 0, 3, 6, ... (it raises: an error row), filters out those at 1,
    4, 7, ..., keeps the others (adding no column)."""
    kind = row["source_index"] % 3
    if kind == 0:
        raise ValueError(f"row {row['source_index']} rejected")
    return None if kind == 1 else {}


def reads_a_file(row, path):
    """Reads `path`: a missing one raises, naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no references at {path}")
    return {}
