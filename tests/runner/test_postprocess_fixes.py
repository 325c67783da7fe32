"""Postprocess results that are not a dict of new columns, column types across shards and resumes, and the
run's stats describing what data/ holds. The real job: local Ray workers, the tiny model, Parquet read back."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.io.columns import RunColumn, conform_rows
from pipeline.io.convert import convert
from pipeline.runner.job import run
from pipeline.runner.stream import WORKER_SWITCH_INTERVAL_S
from tests.runner.test_job import make_job, read_parts, write_prompts

pytestmark = pytest.mark.ray
FNS = "tests.runner.postprocess_fns"


def one_worker_job(tmp_path: Path, rows: int, target: str):
    # One worker holding one shard at a time commits shard 0 first, so shard 0 fixes inferred column types.
    job = make_job(tmp_path, write_prompts(tmp_path / "p.jsonl", rows), cluster__num_workers=1)
    job.run.shards_in_flight = 1
    job.postprocess = {"_target_": f"{FNS}.{target}"}
    return job


def part_schemas(run_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return {
        f.name: [(field.name, str(field.type)) for field in pq.read_schema(f)]
        for f in sorted((run_dir / "data").glob("*.parquet"))
    }


def test_results_that_are_not_new_columns_become_that_rows_error(tmp_path, ray_local):
    job = one_worker_job(tmp_path, 8, "odd_results")
    job.run.shard_size = 8
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    data = read_parts(run_dir).to_pylist()
    assert sorted(r["source_index"] for r in data) == [3, 7], "the other rows of the shard are kept"
    assert all(r["ok"] is True for r in data)
    errors = {e["source_index"]: e for e in read_parts(run_dir, "errors").to_pylist()}
    assert sorted(errors) == [0, 1, 2, 4, 5, 6]
    assert {e["stage"] for e in errors.values()} == {"postprocess"}
    name = f"{FNS}.odd_results"
    assert errors[0]["reason"].startswith(f"{name} returned a list (['not', 'a', 'dict'])")
    assert "must return a dict of the columns to add" in errors[0]["reason"]
    assert f"{name} returned columns the output already has: ['completion']" in errors[1]["reason"]
    assert "rename them" in errors[1]["reason"]
    assert "not non-empty strings: [1]" in errors[2]["reason"]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 2 and stats["errors_by_stage"] == {"postprocess": 6}


@pytest.mark.parametrize(
    ("low", "high", "type_", "texts"),
    [
        (7, "seven", "string", ["7", "seven"]),
        (True, 1, "string", ["true", "1"]),
        (2**53 + 1, 0.5, "string", ["9007199254740993", "0.5"]),
        (2**63, -1, "string", ["9223372036854775808", "-1"]),
    ],
    ids=["int-string", "bool-int", "beyond-2**53-double", "beyond-int64-int"],
)
def test_a_column_mixing_types_is_the_same_whichever_shard_commits_first(
    tmp_path, ray_local, low, high, type_, texts
):
    """Shard 0's type won: 7 then "seven" made every "seven" an error row ("returned 'seven' (str) for column
    'val', which is int64 in this run"), "seven" then 7 kept them all as text; True then 1 wrote 1 as True; an
    int beyond 2**53 then 0.5 rounded the int at finalize (0.5 then the int: an error row); 2**63 was an error
    row even in a string column. The input in both orders (one worker commits shard 0 first) now gives the same
    parts: the column widened to string, every row kept, and the manifest and card name the final type (the
    int beyond 2**53 widens the column only when the run is finalized)."""
    results = []
    for order in ("forward", "reverse"):
        folder = tmp_path / order
        folder.mkdir()
        lines = [json.dumps({"prompt": f"Add: {i}+{2 * i}"}) for i in range(12)]
        (folder / "p.jsonl").write_text("\n".join(lines if order == "forward" else lines[::-1]) + "\n")
        job = make_job(folder, str(folder / "p.jsonl"), cluster__num_workers=1)
        job.run.shards_in_flight = 1
        job.postprocess = {"_target_": f"{FNS}.by_prompt", "low": low, "high": high}
        assert run(job) == 0
        run_dir = folder / "out" / "test-run"
        assert read_parts(run_dir, "errors") is None, read_parts(run_dir, "errors").to_pylist()
        schemas = part_schemas(run_dir)
        assert len(schemas) == 2 and len(set(map(tuple, schemas.values()))) == 1, schemas
        rows = read_parts(run_dir).to_pylist()
        manifest = json.loads((run_dir / "_manifest.json").read_text())
        assert [(c["name"], c["type"]) for c in manifest["columns"]] == [("val", type_)]
        assert f"`val` ({type_})" in (run_dir / "README.md").read_text()
        results.append((next(iter(schemas.values())), sorted((r["prompt"], r["val"]) for r in rows)))
    assert results[0] == results[1]
    schema, values = results[0]
    assert ("val", type_) in schema
    assert values == sorted((f"Add: {i}+{2 * i}", texts[0] if i < 6 else texts[1]) for i in range(12))


def test_a_number_for_a_bool_column_is_kept_only_if_it_is_0_or_1(tmp_path, ray_local):
    """Arrow's safe cast made any number but 0 True, so a 2 or a 0.5 was written as True without an error."""
    job = one_worker_job(tmp_path, 8, "numbers_as_bools")
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    table = read_parts(run_dir)
    assert str(table.schema.field("ok").type) == "bool"
    assert sorted((r["source_index"], r["ok"]) for r in table.to_pylist()) == [
        (0, False),
        (1, True),
        (4, False),
        (5, True),
    ]
    errors = {e["source_index"]: e["reason"] for e in read_parts(run_dir, "errors").to_pylist()}
    assert sorted(errors) == [2, 3, 6, 7]
    assert errors[2].startswith(f"{FNS}.numbers_as_bools returned 2 (int) for column 'ok', which is bool")
    assert "2 is not exactly a bool value: it would be True" in errors[2]
    assert "0.5 is not exactly a bool value: it would be True" in errors[3]


def test_an_int_column_meeting_a_float_in_a_later_shard_is_double_in_every_part(tmp_path, ray_local):
    """A score that is 1 in some rows and 0.5 in others: when shard 0 (ints only) committed first, its int64 made
    every later 0.5 an error row ("returned 0.5 (float) for column 'score', which is int64 in this run"), while a
    run whose first shard held a 0.5 kept them all. The inferred column is widened to double instead."""
    job = one_worker_job(tmp_path, 12, "int_then_half")  # one worker: shard 0 (ints) fixes int64 first
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    assert read_parts(run_dir, "errors") is None, read_parts(run_dir, "errors").to_pylist()
    schemas = part_schemas(run_dir)
    assert len(schemas) == 2 and all(("score", "double") in s for s in schemas.values()), schemas
    rows = sorted(read_parts(run_dir).to_pylist(), key=lambda r: r["source_index"])
    assert [r["score"] for r in rows] == [1.0] * 6 + [1.0, 0.5] * 3
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    source = "inferred from shard 0, widened to double by shard 1"
    assert manifest["columns"] == [{"name": "score", "type": "double", "source": source}]
    assert manifest["rows_out"] == 12 and manifest["rows_error"] == 0
    for part in manifest["parts"]:  # shard 0's part was cast at finalize, its marker with it
        assert part["data_bytes"] == len((run_dir / part["data_key"]).read_bytes())
        assert ["score", "double"] in part["columns"]
    assert "`score` (double)" in (run_dir / "README.md").read_text()

    # A resumed run regenerates shard 0 in the widened type.
    (run_dir / "_commits" / "shard-00000.json").unlink()
    (run_dir / "_SUCCESS").unlink()
    assert run(job) == 0
    assert part_schemas(run_dir) == schemas and read_parts(run_dir, "errors") is None
    assert json.loads((run_dir / "_manifest.json").read_text())["columns"] == manifest["columns"]


def test_a_widening_recorded_before_a_run_failed_is_applied_when_the_rerun_finalizes(tmp_path, ray_local):
    """The first invocation commits shard 0 in int64 and widens the column in shard 1, then fails before
    finalizing (shard 2's rows delete shard 1's part): shard 0's part stays int64 on disk. The rerun
    regenerates shard 1 in double and casts shard 0's part at finalize."""
    run_dir = tmp_path / "out" / "test-run"
    job = one_worker_job(tmp_path, 18, "int_then_half")
    job.postprocess.update(path=str(run_dir / "data" / "part-00001.parquet"), from_index=12)
    assert run(job) == 1
    assert not (run_dir / "_SUCCESS").exists()
    assert ("score", "int64") in part_schemas(run_dir)["part-00000.parquet"]
    assert len(list((run_dir / "_columns").glob("*.widened.json"))) == 1
    assert run(job) == 0
    assert read_parts(run_dir, "errors") is None
    schemas = part_schemas(run_dir)
    assert len(schemas) == 3 and all(("score", "double") in s for s in schemas.values()), schemas
    rows = sorted(read_parts(run_dir).to_pylist(), key=lambda r: r["source_index"])
    assert [r["score"] for r in rows] == [1.0] * 6 + [1.0, 0.5] * 6


def test_every_part_has_the_runs_column_schema_also_after_a_resume(tmp_path, ray_local):
    job = one_worker_job(tmp_path, 12, "late_columns")
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    schemas = part_schemas(run_dir)
    assert len(schemas) == 2
    first, second = schemas.values()
    assert first == second, schemas
    assert first[-2:] == [("late", "string"), ("score2", "double")]
    table = read_parts(run_dir)  # pyarrow.dataset takes the first part's schema: nothing is cast or lost
    rows = sorted(table.to_pylist(), key=lambda r: r["source_index"])
    assert [r["score2"] for r in rows] == [None] * 6 + [0.5] * 6
    assert [r["late"] for r in rows] == [None] * 6 + ["yes"] * 6
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=str(run_dir / "data" / "*.parquet"), split="train")
    assert loaded.features["score2"].dtype == "float64" and loaded.num_rows == 12

    # A resumed run regenerates shard 0 (all None for score2, no `late`) in the types the run fixed.
    (run_dir / "_commits" / "shard-00000.json").unlink()
    (run_dir / "_SUCCESS").unlink()
    assert run(job) == 0
    assert part_schemas(run_dir) == schemas
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert [(c["name"], c["type"]) for c in manifest["columns"]] == [("late", "string"), ("score2", "double")]
    for part in manifest["parts"]:  # markers describe the parts as they are now
        payload = (run_dir / part["data_key"]).read_bytes()
        assert part["data_bytes"] == len(payload)


def test_stats_manifest_and_card_describe_data_and_survive_a_resume(tmp_path, ray_local, caplog):
    job = one_worker_job(tmp_path, 12, "drop_odd")
    job.cluster.num_workers = 2
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    rows = read_parts(run_dir).to_pylist()
    assert sorted(r["source_index"] for r in rows) == list(range(0, 12, 2))
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["tokens_generated"] == sum(r["completion_tokens"] for r in rows)
    assert stats["denoising_steps"] == sum(r["denoising_steps"] for r in rows)
    assert stats["canvases"] == sum(r["canvases"] for r in rows)
    assert sum(stats["finish_reasons"].values()) == len(rows)
    # The workers hand the GIL to the sampler's thread often (pipeline/runner/stream.py)
    assert [w["switch_interval_s"] for w in stats["workers"]] == [WORKER_SWITCH_INTERVAL_S] * 2
    dropped = stats["dropped_after_sampling"]
    assert dropped["rows"] == 6 and dropped["denoising_steps"] > 0 and "not counted" in dropped["note"]
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert sum(p["tokens"] for p in manifest["parts"]) == stats["tokens_generated"]
    assert sum(p["denoising_steps"] for p in manifest["parts"]) == stats["denoising_steps"]
    card = (run_dir / "README.md").read_text()
    assert f"| completion tokens (`data/`) | {stats['tokens_generated']} |" in card
    assert f"| decoder forward passes (`data/`) | {stats['denoising_steps']} |" in card
    assert (
        f"| sampled, then dropped by the postprocess (`errors/`, not in the figures above) | 6 rows, {dropped['tokens']} tokens"
        in card
    )
    # Progress counts each row once (a filtered row was counted when sampled and again as an error).
    done = [int(m) for m in re.findall(r"progress: (\d+)/12 rows", caplog.text)]
    assert done and max(done) <= 12, done
    # Every file of the run has the mode open() would give it.
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777 for p in run_dir.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes

    # Resume after losing one shard's commit: per_worker still sums to the run's totals, and
    # this_invocation.per_worker holds only what this invocation committed.
    (run_dir / "_commits" / "shard-00001.json").unlink()
    (run_dir / "_SUCCESS").unlink()
    assert run(job) == 0
    again = json.loads((run_dir / "stats.json").read_text())
    assert again["tokens_generated"] == stats["tokens_generated"]
    assert again["dropped_after_sampling"] == dropped
    per_worker = again["per_worker"]
    assert sum(w["rows"] for w in per_worker.values()) == again["rows_out"] == 6
    assert sum(w["error_rows"] for w in per_worker.values()) == again["rows_error"] == 6
    assert sum(w["tokens"] for w in per_worker.values()) == again["tokens_generated"]
    assert sum(w["shards"] for w in per_worker.values()) == 2
    this = again["this_invocation"]["per_worker"]
    assert sum(w["shards"] for w in this.values()) == 1
    assert sum(w["rows"] + w["error_rows"] for w in this.values()) == again["this_invocation"]["rows"] == 6


def test_the_card_names_every_column_the_parts_hold(tmp_path, ray_local):
    """The card's Columns section left out `drafts` (sampler.record_drafts) and a postprocess column that is
    None in every row (Arrow's null type in every part, in no manifest `columns`)."""
    job = one_worker_job(tmp_path, 6, "never_set")
    job.sampler.record_drafts = True
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    names = read_parts(run_dir).schema.names
    assert names[names.index("metadata") + 1 :] == ["drafts", "score", "note"]
    card = (run_dir / "README.md").read_text()
    columns = re.search(r"## Columns\n(.*?)\n## ", card, re.S).group(1)
    for name in names:
        assert f"`{name}`" in columns, name
    assert "`score` (double)" in columns and "`note` (null in every row)" in columns
    from huggingface_hub import DatasetCard

    assert DatasetCard(card).data.size_categories == ["n<1K"]  # 6 rows


def test_type_inference_and_conversion_within_a_shard():
    rows = [{"id": str(i), "source_index": i, "prompt": "p", "v": v} for i, v in enumerate([1, "x", None])]
    kept, bad, proposals = conform_rows(rows, {}, shard=3, callable_name="m.f")
    assert [(c.name, str(c.type), c.source) for c in proposals] == [("v", "string", "inferred from shard 3")]
    kept, bad, _ = conform_rows(rows, {c.name: c for c in proposals}, shard=3, callable_name="m.f")
    assert [r["v"] for r in kept] == ["1", "x", None] and not bad  # ints and strings mixed: text
    import pyarrow as pa

    assert convert(2, pa.float64()) == 2.0
    for value, type_ in [(1.5, pa.int64()), ("1", pa.int64()), (True, pa.int64()), (2**70, pa.int64())]:
        with pytest.raises(ValueError):
            convert(value, type_)
    column = {"v": RunColumn("v", pa.int64(), "declared by m.f", 0)}
    kept, bad, _ = conform_rows(rows, column, shard=0, callable_name="m.f")
    assert [r["id"] for r in kept] == ["0", "2"] and [r["id"] for r, _ in bad] == ["1"]
    assert "which is int64 in this run (declared by m.f)" in bad[0][1]


def test_a_postprocess_exception_naming_its_secret_arguments_is_recorded_without_them(tmp_path, ray_local):
    """A postprocess callable calling an API that could not be reached put requests' "Max retries exceeded with
    url: /v1/check?key=CANARY..." into errors/ (and LLM.generate's error): the API key given as
    +postprocess.api_key, which _config.yaml redacts."""
    import socket

    secret = "CANARY-pp/7f3a+k="  # '/', '+' and '=' as the URL encodes them: %2F, %2B, %3D
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        job = one_worker_job(tmp_path, 4, "calls_an_api")
        job.postprocess.update(
            endpoint=f"http://127.0.0.1:{closed.getsockname()[1]}/v1/check",
            api_key=secret,
            headers={"Authorization": "Bearer CANARY-bearer-3c9d"},
        )
        assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    errors = read_parts(run_dir, "errors").to_pylist()
    assert sorted(e["source_index"] for e in errors) == [1, 3]
    for error in errors:
        assert "Max retries exceeded with url: /v1/check?key=<redacted>" in error["reason"], error["reason"]
    shown = "".join(f.read_text(errors="replace") for f in run_dir.rglob("*") if f.is_file())
    shown += repr(errors) + repr(read_parts(run_dir).to_pylist())
    assert "CANARY" not in shown and "7f3a" not in shown
