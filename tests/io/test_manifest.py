"""What a run's driver holds and writes per shard: the commit markers it reads (their `columns` shared) and the
manifest finalize writes (one line per part). benchmarks/bench_finalize.py measures both at 150,000 shards."""

from __future__ import annotations

import json

from pipeline.io.columns import schema_signature
from pipeline.io.commit import MANIFEST, RunStore, ShardCommit, commit_key, data_key
from pipeline.io.parts import OUTPUT_SCHEMA
from pipeline.io.store import LocalStore

COLUMNS = schema_signature(OUTPUT_SCHEMA)  # a run without postprocess stage


def _marker(shard: int, columns: list[list[str]] | None = COLUMNS) -> ShardCommit:
    return ShardCommit(
        shard=shard, rows=2, error_rows=0, data_key=data_key(shard), errors_key=None, data_bytes=10,
        errors_bytes=0, data_sha256="ab", errors_sha256=None, tokens=5, denoising_steps=3, canvases=2,
        filtered=0, finish_reasons={"eos": 2}, errors_by_stage={}, worker="w0", attempt=1, wall_s=1.0,
        committed_at=1.0, columns=columns,
    )  # fmt: skip


def _run(tmp_path, shards: list[int]) -> RunStore:
    store = LocalStore(tmp_path)
    for shard in shards:
        columns = COLUMNS if shard != 7 else [*COLUMNS, ["score", "double"]]
        store.write_text(commit_key(shard), _marker(shard, columns).to_json())
    return RunStore(store, "r")


def test_the_manifest_has_one_line_per_part_and_reads_back_as_written(tmp_path):
    """Indented whole, a part took 1.7 KB of _manifest.json (252 MB for 150,000 shards), and building that text
    was most of the driver's 2.4 GB peak at finalize."""
    run = _run(tmp_path, [0, 1, 2])
    commits = run.committed()
    parts = [vars(commits[s]) for s in sorted(commits)]
    manifest = {
        "input": {"path": "in/parts.jsonl"},  # a value that reads like the parts placeholder does not move it
        "parts": parts,
        "rows_out": 6,
        "sampler": {"stop": ['"parts"', "\u0000"]},
    }
    run.finalize(commits, manifest, {}, "card")
    text = (tmp_path / MANIFEST).read_text()
    assert json.loads(text) == manifest
    part_lines = [line for line in text.splitlines() if line.lstrip().startswith('{"attempt": 1')]
    assert len(part_lines) == 3 and all(json.loads(line.rstrip(","))["rows"] == 2 for line in part_lines)
    assert text.startswith(
        '{\n  "input": {\n    "path": "in/parts.jsonl"\n  },\n  "parts": [\n    {"attempt"'
    )
    run.finalize({}, {"parts": [], "rows_out": 0}, {}, "card")
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"parts": [], "rows_out": 0}


def test_markers_of_one_schema_share_their_columns_and_come_in_shard_order(tmp_path):
    """Each marker held its own copy of the part's columns, 2.5 of the 4 KB a marker takes in the driver, which
    holds every marker of the run (15 KB a shard at finalize, measured)."""
    commits = _run(tmp_path, [100_000, 99_999, 3, 7]).committed()
    assert commits[3].columns is not COLUMNS, "read from the markers"
    assert list(commits) == [3, 7, 99_999, 100_000], "by shard, not by key (shard-100000 < shard-99999)"
    assert commits[3].columns is commits[99_999].columns is commits[100_000].columns
    assert commits[3].columns == COLUMNS and commits[7].columns == [*COLUMNS, ["score", "double"]]
    again = _run(tmp_path / "other", [5]).committed()
    assert again[5].columns == COLUMNS and again[5].columns is commits[3].columns
