"""ShardWorker in this process, without Ray: what a shard commits (data/, errors/, its marker), what it reports
to the progress board, and the stats.json and manifest built from its markers, read back from the files."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.runner.job import prepare
from pipeline.runner.report import build_manifest, build_stats
from pipeline.runner.worker import ProgressBoard, ShardWorker

GOOD = [json.dumps({"prompt": f"Add: {i}+{i}"}) for i in range(8)]
TOO_LONG = json.dumps({"prompt": "x" * 200})  # more tokens than max_prompt_tokens=64: stage tokenize


def _prep(tmp_path, lines, shard_size, completions=1, postprocess=None):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    job = JobConfig(
        model=ModelConfig(path="builtin:tiny-diffusiongemma-random", max_prompt_tokens=64),
        sampler=SamplerConfig(
            max_denoising_steps=4, max_new_tokens=32, batch_size=4, completions_per_prompt=completions
        ),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(id="r", shard_size=shard_size),
    )
    if postprocess:
        job.postprocess = {"_target_": f"tests.runner.postprocess_fns.{postprocess}"}
    return prepare(job, resolved_yaml="run: {}\n")


class _Board:
    """A ProgressBoard in this process, called as the worker calls the Ray actor: board.report.remote(...)."""

    def __init__(self) -> None:
        self.board = ProgressBoard()
        self.report = SimpleNamespace(remote=self.board.report)


def _worker(prep, board=None) -> ShardWorker:
    return ShardWorker(
        prep.spec, prep.run_store, compression="zstd", name="w0", torch_threads=None, board=board
    )


def _shard(prep, shard: int):
    size = prep.job.run.shard_size
    return prep.records.table.slice(shard * size, size)


def _read(run_dir, kind: str) -> list[dict]:
    return [row for f in sorted((run_dir / kind).glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def test_the_board_counts_every_input_row_and_completion_once_and_a_retry_replaces_its_shards_rows(tmp_path):
    """Rows rejected while reading count whole, each completion 1/n of its row, tokenize rejects once the
    shard ends; every report reaches the board (the last one forced); a retried shard counts its latest
    attempt's rows only, while the worker's counters count the work of both attempts."""
    lines = [GOOD[0], "{broken", "{broken", GOOD[1], GOOD[2], TOO_LONG, GOOD[3], GOOD[4]]
    prep = _prep(tmp_path, lines, shard_size=4, completions=2)
    handle = _Board()
    worker = _worker(prep, handle)
    commits = [worker.process(0, _shard(prep, 0), 1), worker.process(1, _shard(prep, 1), 1)]
    commits.append(worker.process(1, _shard(prep, 1), 2))  # shard 1 retried
    snapshot = handle.board.snapshot()
    assert snapshot["shards"] == {0: pytest.approx(4), 1: pytest.approx(4)}
    w0 = snapshot["workers"]["w0"]
    assert w0["rows"] == pytest.approx(12) and w0["sampled"] == 2 * (2 + 3 + 3)
    stats = [
        json.loads((tmp_path / "out" / "r" / "_commits" / f"shard-0000{s}.json").read_text()) for s in (0, 1)
    ]
    assert [c["errors_by_stage"] for c in stats] == [{"read": 2}, {"tokenize": 1}]
    # no postprocess: every sampled completion is in data/, the retry's as the first attempt's
    assert w0["tokens"] == sum(c["tokens"] for c in commits) and w0["steps"] == sum(
        c["denoising_steps"] for c in commits
    )
    assert handle.board.sampler_counters() == {worker.instance: worker.sampler_counters()["counters"]}


def test_a_row_that_killed_its_worker_is_an_error_row_and_its_neighbours_are_generated(tmp_path):
    """`skip` positions are within the shard: the row at that position is written to errors/ (stage worker,
    its prompt as raw), not generated; the others land in data/."""
    prep = _prep(tmp_path, GOOD[:6], shard_size=3)
    commit = _worker(prep).process(1, _shard(prep, 1), 1, skip={1: "killed its worker"})
    run_dir = tmp_path / "out" / "r"
    errors = _read(run_dir, "errors")
    assert [(e["source_index"], e["stage"], e["reason"], e["raw"]) for e in errors] == [
        (4, "worker", "killed its worker", "Add: 4+4")
    ]
    assert sorted(r["source_index"] for r in _read(run_dir, "data")) == [3, 5]
    assert (commit["rows"], commit["error_rows"]) == (2, 1)


def test_stats_and_manifest_count_data_errors_dropped_work_and_this_invocations_rows(tmp_path):
    """Per completion of 5 prompts (shards of 2): 0 and 2 kept, 1 filtered out, 3 rejected (a string for a
    double column). data/ totals count kept rows only; what was sampled and dropped is in
    dropped_after_sampling; this invocation's rows are the input rows of the shards it committed (the last
    shard has 1), its row passes include the dropped ones; the manifest totals read every part."""
    prep = _prep(tmp_path, GOOD[:5], shard_size=2, completions=4, postprocess="by_completion")
    _worker(prep).process(0, _shard(prep, 0), 1)  # an earlier invocation's shard
    started = time.time()
    handle = _Board()
    worker = _worker(prep, handle)
    new_commits = {1: worker.process(1, _shard(prep, 1), 1), 2: worker.process(2, _shard(prep, 2), 2)}
    all_commits = prep.run_store.committed()
    counters = {**worker.sampler_counters()["counters"], "workers": 1}
    stats = build_stats(prep, all_commits, new_commits, [], started, [], counters)
    run_dir = tmp_path / "out" / "r"
    data, errors = _read(run_dir, "data"), _read(run_dir, "errors")
    assert sorted((r["source_index"], r["completion_index"]) for r in data) == [
        (i, c) for i in range(5) for c in (0, 2)
    ]
    assert [r["source_index"] for r in data[:4]] == [0, 0, 1, 1], "a part's rows in input order"
    assert all(e["stage"] == "postprocess" for e in errors) and len(errors) == 10
    assert sum(e["reason"].startswith("completion 3: ") for e in errors) == 5
    assert (stats["rows_out"], stats["rows_error"], stats["rows_filtered"]) == (10, 10, 5)
    assert stats["errors_by_stage"] == {"postprocess": 10} and sum(stats["finish_reasons"].values()) == 10
    tokens, steps = sum(r["completion_tokens"] for r in data), sum(r["denoising_steps"] for r in data)
    canvases = sum(r["canvases"] for r in data)
    assert (stats["tokens_generated"], stats["denoising_steps"]) == (tokens, steps)
    assert stats["mean_steps_per_canvas"] == round(steps / canvases, 3)
    assert stats["per_worker"]["w0"]["rows"] == 10 and stats["shards"]["retried"] == 1
    # what this invocation's worker sampled (the board) is what data/ holds of it plus what was dropped
    sampled = handle.board.snapshot()["workers"]["w0"]
    this_data = [r for r in data if r["source_index"] >= 2]
    dropped = stats["dropped_after_sampling"]
    assert dropped["rows"] == 10 and sampled["sampled"] == 12
    this_tokens = sum(r["completion_tokens"] for r in this_data)
    this_steps = sum(r["denoising_steps"] for r in this_data)
    first = json.loads((run_dir / "_commits" / "shard-00000.json").read_text())
    assert dropped["tokens"] == sampled["tokens"] - this_tokens + first["dropped_tokens"]
    assert dropped["denoising_steps"] == sampled["steps"] - this_steps + first["dropped_denoising_steps"]
    this = stats["this_invocation"]
    assert (this["rows"], this["tokens"]) == (3, this_tokens)
    calls = counters["decoder_calls"]
    assert this["sampler"]["live_rows_per_pass"] == round(
        min(sampled["steps"], counters["decoder_row_steps"]) / calls, 3
    )
    manifest = build_manifest(prep, all_commits)
    assert (manifest["rows_out"], manifest["rows_error"]) == (10, 10)
    assert [p["shard"] for p in manifest["parts"]] == [0, 1, 2]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (
            {"model_path": "/nonexistent/model"},
            "pipeline.models.loader.ModelError: model.path='/nonexistent/model' is not a directory",
        ),
        (
            {
                "model_path": "builtin:tiny-diffusiongemma-random",
                "postprocess": {"_target_": "tests.runner.no_such_module.fn"},
            },
            "pipeline.postprocess.PostprocessError: ",
        ),
    ],
    ids=["model", "postprocess"],
)
def test_a_start_that_fails_for_the_users_reason_is_kept_and_raised_by_every_call(spec, error):
    """A model that does not load raised from the actor's __init__: Ray printed the actor's ~25-line creation
    traceback on the driver's console before the driver's line 'worker 0 failed to start: ...ModelError: ...'.
    The worker now keeps such an error, and each call raises it as WorkerNotStarted: that line, with the
    traceback (for the driver's debug log)."""
    from pipeline.generation import GenerationSpec
    from pipeline.runner.pool import WorkerNotStarted

    worker = ShardWorker(GenerationSpec(**spec), None, compression="zstd", name="w0", torch_threads=None)
    for call in (worker.ready, worker.sampler_counters, lambda: worker.process(0, None, 1)):
        with pytest.raises(WorkerNotStarted) as raised:
            call()
        assert str(raised.value).startswith(error), raised.value
        trace = raised.value.traceback
        assert trace.startswith("Traceback (most recent call last):") and error in trace, trace


def test_a_start_that_fails_for_another_reason_still_fails_the_actors_creation(monkeypatch):
    """An unexpected exception (a bug) is not kept: Ray reports the failed creation with its traceback."""
    import pipeline.generation

    def broken(self, spec):
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline.generation.Generator, "__init__", broken)
    from pipeline.generation import GenerationSpec

    with pytest.raises(KeyError, match="a bug"):
        ShardWorker(GenerationSpec(model_path="x"), None, compression="zstd", name="w0", torch_threads=None)
