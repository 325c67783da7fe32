"""The real job: local Ray workers, the tiny model, Parquet read back and checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    MaskSamplerConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.data.readers import read_input
from pipeline.io.parts import OUTPUT_SCHEMA
from pipeline.runner.job import run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

STEPS, NEW_TOKENS = 6, 48  # 2 canvases of 32, kept short: these tests check the pipeline, not quality


def make_job(tmp_path: Path, data_path: str, **overrides) -> JobConfig:
    job = JobConfig(
        model=ModelConfig(path="builtin:tiny-diffusiongemma-random"),
        sampler=SamplerConfig(max_denoising_steps=STEPS, max_new_tokens=NEW_TOKENS, batch_size=4),
        data=DataConfig(path=data_path, id_column=None),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=2),
        run=RunConfig(id="test-run", shard_size=6, progress_interval_s=0.5),
    )
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(job, section), name, value)
    return job


def write_prompts(path: Path, count: int, extra: list[str] | None = None) -> str:
    lines = [json.dumps({"prompt": f"Add: {i}+{2 * i}", "n": i}) for i in range(count)]
    path.write_text("\n".join(lines + (extra or [])) + "\n")
    return str(path)


def read_parts(run_dir: Path, kind: str = "data"):
    files = sorted((run_dir / kind).glob("*.parquet"))
    return pads.dataset([str(f) for f in files], format="parquet").to_table() if files else None


def test_job_writes_one_row_per_prompt(tmp_path, ray_local):
    data = write_prompts(tmp_path / "prompts.jsonl", 20)
    job = make_job(tmp_path, data)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    table = read_parts(run_dir)
    rows = table.to_pylist()
    expected_ids = read_input(job.data).table.column("id").to_pylist()
    assert len(rows) == 20
    assert sorted(r["id"] for r in rows) == sorted(expected_ids)
    assert len({r["id"] for r in rows}) == 20
    for r in rows:
        assert 1 <= r["denoising_steps"] <= STEPS * r["canvases"]
        assert r["finish_reason"] in ("eos", "length")
        assert r["completion_tokens"] <= NEW_TOKENS
        assert r["run_id"] == "test-run" and r["model"] == "builtin:tiny-diffusiongemma-random"
    # Completions are the model's tokens, decoded: the one-process API gives the same rows for the same ids.
    from pipeline import LLM

    llm = LLM("builtin:tiny-diffusiongemma-random", max_denoising_steps=STEPS, max_new_tokens=NEW_TOKENS)
    by_id = {r["id"]: r for r in rows}
    inputs = read_input(job.data).table.to_pylist()
    direct = llm.generate([r["prompt"] for r in inputs], ids=[r["id"] for r in inputs])
    for d in direct:
        assert by_id[d.id]["completion"] == d.completion
        assert by_id[d.id]["denoising_steps"] == d.denoising_steps
    assert any(r["completion"] for r in rows)

    # The run's files, written last-to-first as the contract says.
    for name in ("_manifest.json", "_config.yaml", "stats.json", "README.md", "_SUCCESS", "_run.json"):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert sum(p["rows"] for p in manifest["parts"]) == 20 and len(manifest["parts"]) == 4
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 20 and stats["rows_error"] == 0
    assert stats["denoising_steps"] == sum(r["denoising_steps"] for r in rows)
    assert set(stats["per_worker"]) == {"w0", "w1"}
    # The samplers' counters: every committed pass was computed, in batches of at most sampler.batch_size rows,
    # and every prompt token was encoded or copied from another row's slot.
    sampler = stats["this_invocation"]["sampler"]
    counters = sampler["counters"]
    assert counters["workers"] == 2 and sampler["batch_size"] == 4
    assert counters["decoder_row_steps"] >= stats["denoising_steps"]
    assert sampler["live_rows_per_pass"] == round(stats["denoising_steps"] / counters["decoder_calls"], 3)
    assert sampler["live_rows_per_pass"] <= sampler["computed_rows_per_pass"] <= 4
    assert counters["encoder_tokens"] + counters["prompt_tokens_shared"] >= sum(
        r["prompt_tokens"] for r in rows
    )
    card = (run_dir / "README.md").read_text()
    assert "load_dataset" in card
    # The card links nowhere: it once linked "canvasflow" to the bare https://github.com/.
    assert "](http" not in card

    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=str(run_dir / "data" / "*.parquet"), split="train")
    assert loaded.num_rows == 20


def test_rerun_of_a_complete_run_does_nothing_and_a_changed_config_is_refused(tmp_path, ray_local, caplog):
    data = write_prompts(tmp_path / "p.jsonl", 6)
    assert run(make_job(tmp_path, data)) == 0
    run_dir = tmp_path / "out" / "test-run"
    before = (run_dir / "_SUCCESS").read_text()
    config = (run_dir / "_config.yaml").read_text()
    assert "num_workers: 2" in config
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(make_job(tmp_path, data, cluster__num_workers=1)) == 0
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and "this run" not in done[0], done  # nothing ran now: no wall time claimed for it
    assert (run_dir / "_SUCCESS").read_text() == before, "a complete run is not redone"
    assert (run_dir / "_config.yaml").read_text() == config, "it keeps the config that made it"
    changed = make_job(tmp_path, data, sampler__seed=7, sampler__t_min=0.3)
    caplog.clear()
    assert run(changed) == 2, "a different config under the same run id is refused"
    assert (run_dir / "_SUCCESS").read_text() == before
    # naming the settings that changed, not two digests ("config_fingerprint c1e61ee4b1e9 -> 7e31f8bed961")
    assert (
        "a different input or config (sampler.seed 0 -> 7, sampler.t_min 0.4 -> 0.3). Use a new"
        in caplog.text
    )
    extended = write_prompts(tmp_path / "p2.jsonl", 7)
    caplog.clear()
    assert run(make_job(tmp_path, extended)) == 2, "another input too"
    assert f"(the input's content (data.path {data} -> {extended}), input rows 6 -> 7)" in caplog.text
    assert run(make_job(tmp_path, data, sampler__seed=7, run__overwrite=True)) == 0
    assert read_parts(run_dir).column("seed").to_pylist() == [7] * 6


def test_rerun_of_a_complete_run_missing_its_stats_or_card_writes_them_again(tmp_path, ray_local):
    """A complete run whose stats.json was deleted (or cut short) made every rerun crash with a StoreError
    (JSONDecodeError) traceback and exit code 1; a missing README.md or _manifest.json went unnoticed."""
    data = write_prompts(tmp_path / "p.jsonl", 6)
    assert run(make_job(tmp_path, data)) == 0
    run_dir = tmp_path / "out" / "test-run"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    (run_dir / "stats.json").unlink()
    (run_dir / "README.md").unlink()
    assert run(make_job(tmp_path, data)) == 0
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 6 and stats["shards"]["skipped_already_committed"] == 1
    assert "rows out" in (run_dir / "README.md").read_text()
    assert json.loads((run_dir / "_manifest.json").read_text())["parts"] == manifest["parts"]
    (run_dir / "stats.json").write_text('{"rows_in": ')
    assert run(make_job(tmp_path, data)) == 0
    assert json.loads((run_dir / "stats.json").read_text())["rows_out"] == 6
    # A manifest cut short (a copy interrupted) was kept for good: "already complete; nothing to do".
    (run_dir / "_manifest.json").write_text('{"canvasflow_version": "0.1.0", "par')
    assert run(make_job(tmp_path, data)) == 0
    assert json.loads((run_dir / "_manifest.json").read_text())["parts"] == manifest["parts"]


def test_a_final_file_that_cannot_be_written_exits_1_with_a_message_and_a_rerun_finishes(
    tmp_path, ray_local, caplog
):
    """A full disk (or a store gone) while the run's manifest, stats or card were written crashed the driver with
    a StoreError traceback (Hydra's "Error executing job"), not saying that the committed shards are kept nor
    what to do. Now it exits 1 saying so, and a rerun finishes the run from its commit markers."""
    data = write_prompts(tmp_path / "p.jsonl", 6)
    run_dir = tmp_path / "out" / "test-run"
    (run_dir / "_manifest.json").mkdir(parents=True)  # a write there fails, as on a full disk
    with caplog.at_level("ERROR", logger="canvasflow"):
        assert run(make_job(tmp_path, data)) == 1
    assert "_manifest.json" in caplog.text and "rerun the same command to finish the run" in caplog.text
    assert not (run_dir / "_SUCCESS").exists() and len(list((run_dir / "_commits").iterdir())) == 1
    (run_dir / "_manifest.json").rmdir()
    assert run(make_job(tmp_path, data)) == 0
    assert json.loads((run_dir / "_manifest.json").read_text())["rows_out"] == 6


def test_rerun_of_a_complete_run_with_a_deleted_part_regenerates_that_shard(tmp_path, ray_local, caplog):
    """A data part deleted from a complete run: the rerun said "complete, nothing to do" and the run stayed
    short of the part's rows for good. Now _SUCCESS goes, the shard is regenerated and the run is whole."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    job = make_job(tmp_path, data, run__shard_size=4)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    before = read_parts(run_dir).sort_by("id")
    parts = sorted((run_dir / "data").glob("*.parquet"))
    assert len(parts) == 3
    parts[1].unlink()
    with caplog.at_level("WARNING"):
        assert run(job) == 0
    assert "are missing or altered (removed or changed by hand" in caplog.text
    after = read_parts(run_dir).sort_by("id")
    assert after.num_rows == 12 and after.column("id").to_pylist() == before.column("id").to_pylist()
    assert after.column("completion").to_pylist() == before.column("completion").to_pylist()
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 12 and stats["shards"]["skipped_already_committed"] == 2
    assert (run_dir / "_SUCCESS").exists()


def test_rerun_of_a_complete_run_with_an_unreadable_commit_marker_regenerates_that_shard(
    tmp_path, ray_local, caplog
):
    """A commit marker cut short in a complete run: the rerun warned that its shard "counts as uncommitted and is
    regenerated", then said "already complete; nothing to do" and left the marker broken. Now the shard is
    regenerated (its part was an uncommitted leftover) and the run is whole again, its markers all readable."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    job = make_job(tmp_path, data, run__shard_size=4)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    before = read_parts(run_dir).sort_by("id")
    marker = run_dir / "_commits" / "shard-00001.json"
    marker.write_text(marker.read_text()[:40])
    with caplog.at_level("INFO"):
        assert run(make_job(tmp_path, data, run__shard_size=4, run__dry_run=True)) == 0
        assert "resumes: 2 of 3 shard(s) committed; 1 to generate" in caplog.text
        assert run(job) == 0
    assert "the commit markers of shard(s) [1] are missing or unreadable" in caplog.text
    assert json.loads(marker.read_text())["shard"] == 1
    after = read_parts(run_dir).sort_by("id")
    assert after.column("completion").to_pylist() == before.column("completion").to_pylist()
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 12 and stats["shards"]["committed_this_invocation"] == 1


def test_a_run_whose_every_row_is_rejected_has_a_card_that_reads_its_errors(tmp_path, ray_local, caplog):
    """The card's snippet and the closing log line point at errors/, where the rows are; the card's own
    snippet reads the rejected rows back."""
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": ""}\n{"prompt": null}\n')
    with caplog.at_level("INFO"):
        assert run(make_job(tmp_path, str(data))) == 0
    run_dir = tmp_path / "out" / "test-run"
    assert f"output: no rows; the 2 rejected row(s) and why are in {run_dir}/errors/" in caplog.text
    card = (run_dir / "README.md").read_text()
    assert "This run has no output rows: each of its 2 input rows was rejected" in card
    scope: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", card, re.S).group(1), "card", "exec"), scope)
    assert sorted(scope["errors"].column("reason").to_pylist()) == [
        "prompt (column 'prompt') is empty",
        "prompt (column 'prompt') is null",
    ]
    assert json.loads((run_dir / "stats.json").read_text())["rows_out"] == 0


def test_a_run_whose_every_row_is_rejected_reads_as_an_empty_dataset(tmp_path, ray_local):
    """No shard wrote a data part, so load_dataset over data/*.parquet, pyarrow and pandas over data/ and
    load_dataset(<run>) through the card's `data_files` failed (no such folder, "No (supported) data files
    found"). data/ now holds one part without rows, in the output schema, listed in the manifest."""
    import pandas as pd
    from datasets import load_dataset

    data = tmp_path / "p.jsonl"
    data.write_text("".join('{"prompt": ""}\n' for _ in range(8)))
    job = make_job(tmp_path, str(data), run__shard_size=3)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    table = pads.dataset(str(run_dir / "data"), format="parquet").to_table()
    assert table.num_rows == 0 and table.schema == OUTPUT_SCHEMA
    assert pq.read_table(run_dir / "data").schema == OUTPUT_SCHEMA
    frame = pd.read_parquet(run_dir / "data")
    assert len(frame) == 0 and list(frame.columns) == OUTPUT_SCHEMA.names
    # datasets builds no split without rows ("Instruction 'train' corresponds to no data!"); streamed, the
    # files are found and read, through the card's YAML `configs` too.
    loaded = load_dataset("parquet", data_files=str(run_dir / "data" / "*.parquet"), streaming=True)
    from_card = load_dataset(str(run_dir), split="train", streaming=True)
    for streamed in (loaded["train"], from_card):
        assert list(streamed) == [] and list(streamed.features) == OUTPUT_SCHEMA.names
    assert read_parts(run_dir, "errors").num_rows == 8
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    parts = {p["data_key"]: p for p in manifest["parts"] if p["data_key"]}
    assert list(parts) == ["data/part-00000.parquet"] and parts["data/part-00000.parquet"]["rows"] == 0
    assert (
        parts["data/part-00000.parquet"]["data_bytes"] == (run_dir / "data/part-00000.parquet").stat().st_size
    )
    assert manifest["rows_out"] == 0 and manifest["rows_error"] == 8
    (run_dir / "_SUCCESS").unlink()  # a rerun finds every part as committed: nothing is regenerated
    assert run(job) == 0
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["shards"]["committed_this_invocation"] == 0 and stats["rows_error"] == 8


def test_resume_regenerates_only_uncommitted_shards(tmp_path, ray_local, caplog):
    data = write_prompts(tmp_path / "p.jsonl", 18)
    assert run(make_job(tmp_path, data)) == 0
    run_dir = tmp_path / "out" / "test-run"
    complete = {r["id"]: r["completion"] for r in read_parts(run_dir).to_pylist()}
    # Simulate a crash after shard 1 wrote its part but before it committed, and one mid-write leftover.
    (run_dir / "_commits" / "shard-00001.json").unlink()
    (run_dir / "_SUCCESS").unlink()
    (run_dir / "data" / "part-00009.parquet").write_bytes(b"partial garbage")
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(make_job(tmp_path, data)) == 0
    done = [int(m) for m in re.findall(r"progress: (\d+)/18 rows", caplog.text)]
    assert done and done[-1] == 18, f"progress counts the rows of the shards committed before: {done}"
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["shards"]["committed_this_invocation"] == 1
    assert stats["shards"]["skipped_already_committed"] == 2
    assert not (run_dir / "data" / "part-00009.parquet").exists(), "uncommitted objects are cleaned up"
    rows = read_parts(run_dir).to_pylist()
    assert {r["id"]: r["completion"] for r in rows} == complete, "exactly once, same content"


def test_a_rerun_that_only_finalizes_says_nothing_was_generated_now(tmp_path, ray_local, caplog):
    """Every shard committed, the driver killed while it finalized (no _SUCCESS, no card): the rerun finalized
    the run and ended with "0.2s this run, 0.0 tok/s", as if it had generated slowly. It now says that it
    generated nothing and finalized the run from the shards committed earlier."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    job = make_job(tmp_path, data, cluster__num_workers=1)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    (run_dir / "_SUCCESS").unlink()
    (run_dir / "README.md").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(job) == 0
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done: ")]
    assert len(done) == 1 and done[0].endswith(
        "| nothing generated now: finalized from the 2 shard(s) committed earlier"
        f" ({json.loads((run_dir / 'stats.json').read_text())['this_invocation']['wall_time_s']:.1f}s)"
    ), done
    assert "tok/s" not in done[0] and "this run" not in done[0]
    assert (run_dir / "_SUCCESS").exists() and (run_dir / "README.md").exists()


def test_a_resume_with_another_codec_keeps_the_runs_codec(tmp_path, ray_local, caplog):
    """A resume with output.compression=snappy wrote its parts as snappy beside the zstd ones, and
    _manifest.json named snappy for them all; the run keeps the codec it was started with, and says so."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    assert run(make_job(tmp_path, data)) == 0
    run_dir = tmp_path / "out" / "test-run"
    (run_dir / "_commits" / "shard-00001.json").unlink()
    (run_dir / "_SUCCESS").unlink()
    with caplog.at_level("WARNING"):
        assert run(make_job(tmp_path, data, output__compression="snappy")) == 0
    assert "output.compression=snappy is not applied to run test-run: it was started with zstd" in caplog.text
    codecs = {
        pq.ParquetFile(part).metadata.row_group(0).column(0).compression
        for part in run_dir.glob("data/*.parquet")
    }
    assert codecs == {"ZSTD"}
    assert json.loads((run_dir / "_manifest.json").read_text())["compression"] == "zstd"
    assert "compression: zstd" in (run_dir / "_config.yaml").read_text()


def test_bad_rows_go_to_errors_and_the_job_completes(tmp_path, ray_local):
    too_long = json.dumps({"prompt": "x" * 200})
    data = write_prompts(
        tmp_path / "p.jsonl",
        8,
        extra=["{broken", json.dumps({"prompt": 5}), too_long, json.dumps({"prompt": ""})],
    )
    job = make_job(tmp_path, data, model__max_prompt_tokens=64)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    assert read_parts(run_dir).num_rows == 8
    errors = read_parts(run_dir, "errors").to_pylist()
    assert sorted(e["source_index"] for e in errors) == [8, 9, 10, 11]
    by_index = {e["source_index"]: e for e in errors}
    assert by_index[8]["stage"] == "read" and "malformed JSON" in by_index[8]["reason"]
    assert "must be a string" in by_index[9]["reason"]
    assert by_index[10]["stage"] == "tokenize" and "more than fit" in by_index[10]["reason"]
    assert "is empty" in by_index[11]["reason"]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_in"] == 12 and stats["rows_out"] + stats["rows_error"] == 12


def test_postprocess_adds_columns_and_filters(tmp_path, ray_local):
    data = write_prompts(tmp_path / "p.jsonl", 6)
    postprocess = {"_target_": "pipeline.tasks.checker.check_row", "drop_incorrect": False}
    job = make_job(tmp_path, data)
    job.postprocess = postprocess
    assert run(job) == 0
    table = read_parts(tmp_path / "out" / "test-run")
    assert {"task", "expected", "is_correct", "score"} <= set(table.column_names)
    assert table.schema.field("is_correct").type == "bool"
    assert set(table.column("task").to_pylist()) == {"addition"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"output__uri": "/proc/canvasflow-not-writable"}, "cannot write"),
        ({"data__prompt_column": "question"}, "prompt column 'question'"),
        ({"model__path": "/no/such/model"}, "is not a directory"),
        ({"sampler__t_max": 0.3}, "sampler.t_max=0.3 must be greater than sampler.t_min=0.4"),
        # a mask-sampler knob on a DiffusionGemma model was silently ignored (the reverse is refused)
        (
            {"sampler__mask": MaskSamplerConfig(cache="dual")},
            "sampler.mask.cache='dual' is a mask-diffusion (LLaDA, Dream) setting",
        ),
    ],
)
def test_startup_errors_exit_2_before_any_work(tmp_path, caplog, overrides, message):
    data = write_prompts(tmp_path / "p.jsonl", 3)
    assert run(make_job(tmp_path, data, **overrides)) == 2
    assert message in caplog.text
    assert not (tmp_path / "out" / "test-run" / "data").exists()


def test_cli_on_a_user_jsonl_with_a_custom_prompt_column(tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"Reverse: word{i}", "source": "me"}) for i in range(5))
    )
    out = tmp_path / "x"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "generate.py"),
            f"data.path={data}",
            "data.prompt_column=question",
            f"output.uri={out}",
            "run.id=r1",
            "model.path=builtin:tiny-diffusiongemma-random",
            f"sampler.max_denoising_steps={STEPS}",
            "sampler.max_new_tokens=32",
            "cluster.num_workers=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "progress:" in log
    assert f"output: {out}/r1/data/" in log
    assert "Token authentication" not in log, "Ray's warning about the local instance's default (token auth)"
    table = pq.read_table(out / "r1" / "data" / "part-00000.parquet")
    assert table.num_rows == 5
    assert json.loads(table.column("metadata")[0].as_py()) == {"source": "me"}


def test_workers_that_cannot_be_placed_fail_clearly(tmp_path, caplog, ray_local):
    """On a cluster (the test's Ray instance, joined) without the GPUs the workers ask for; a local job is
    refused that before it starts (tests/config/test_startup_checks.py)."""
    data = write_prompts(tmp_path / "p.jsonl", 3)
    job = make_job(tmp_path, data, cluster__num_gpus_per_worker=1.0, cluster__worker_start_timeout_s=3.0)
    job.cluster.mode, job.cluster.address = "ray", "auto"
    assert run(job) == 2
    assert "did not start within cluster.worker_start_timeout_s=3s" in caplog.text
    assert "1.0 GPU" in caplog.text and "0 GPU free" in caplog.text


def test_too_few_rows_held_per_worker_are_warned_about(caplog):
    """One shard at a time, each shard ends with its batch draining; with shards in flight (the default) the
    next shard's rows take the freed slots, if the rows held can fill the batch."""
    import logging

    from pipeline.config.schema import JobConfig
    from pipeline.runner.plan import warn_shard_drain

    job = JobConfig()
    job.sampler.batch_size, job.run.shard_size = 32, 64
    with caplog.at_level(logging.WARNING, logger="canvasflow"):
        warn_shard_drain(job, num_shards=10)  # the default: 2 in flight hold 128 rows, 4 batches
        job.run.shard_size = 16
        warn_shard_drain(job, num_shards=10)
        job.run.shard_size, job.run.shards_in_flight = 64, 1
        warn_shard_drain(job, num_shards=10)
        warn_shard_drain(job, num_shards=1)  # one shard drains once whatever its size
        job.run.shard_size = 256
        warn_shard_drain(job, num_shards=10)
        job.run.shard_size, job.sampler.batching = 64, "static"
        warn_shard_drain(job, num_shards=10)
    assert [r.getMessage() for r in caplog.records] == [
        "run.shard_size=16 with run.shards_in_flight=2 holds 1.0x sampler.batch_size=32 per worker: too few rows "
        "to keep the batch full as shards end, which wastes GPU passes (benchmarks/bench_shard_size.py); use "
        "run.shard_size >= 64",
        "run.shard_size=64 with run.shards_in_flight=1 holds 2.0x sampler.batch_size=32 per worker: too few rows "
        "to keep the batch full as shards end, which wastes GPU passes (benchmarks/bench_shard_size.py); use "
        "run.shard_size >= 256",
    ]


def test_a_part_deleted_after_its_shard_committed_fails_the_run_and_a_rerun_regenerates_it(
    tmp_path, ray_local
):
    """The driver checks every committed part once its workers are done: a part gone since its commit (here:
    deleted while the next shard ran) fails the run (exit 1, no _SUCCESS), rather than finalizing a run that
    lacks its rows; the rerun regenerates that shard."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    run_dir = tmp_path / "out" / "test-run"
    job = make_job(tmp_path, data, cluster__num_workers=1, run__shards_in_flight=1)
    job.postprocess = {
        "_target_": "tests.runner.postprocess_fns.delete_file",
        "path": str(run_dir / "data" / "part-00000.parquet"),
        "from_index": 6,  # the rows of shard 1, which runs after shard 0 committed
    }
    assert run(job) == 1
    assert not (run_dir / "_SUCCESS").exists(), "a run missing a committed part is not complete"
    assert not (run_dir / "_commits" / "shard-00000.json").exists(), "the shard is uncommitted"
    assert run(job) == 0  # only shard 0 runs, whose rows delete nothing
    assert sorted(read_parts(run_dir).column("source_index").to_pylist()) == list(range(12))


def test_a_complete_run_whose_regeneration_cannot_start_is_no_longer_marked_complete(
    tmp_path, caplog, ray_local
):
    """A complete run with a part deleted by hand: the rerun that finds it drops _SUCCESS before it regenerates
    the shard, so that a rerun failing to start its workers leaves no run claiming to be complete without it."""
    data = write_prompts(tmp_path / "p.jsonl", 12)
    run_dir = tmp_path / "out" / "test-run"
    assert run(make_job(tmp_path, data)) == 0
    (run_dir / "data" / "part-00001.parquet").unlink()
    job = make_job(tmp_path, data, cluster__num_gpus_per_worker=1.0, cluster__worker_start_timeout_s=3.0)
    job.cluster.mode, job.cluster.address = "ray", "auto"
    assert run(job) == 2
    assert "did not start within cluster.worker_start_timeout_s=3s" in caplog.text
    assert not (run_dir / "_SUCCESS").exists(), "the run lacks shard 1's rows: it is not complete"
    assert run(make_job(tmp_path, data)) == 0 and (run_dir / "_SUCCESS").exists()
    assert read_parts(run_dir).num_rows == 12
