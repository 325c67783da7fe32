"""The run's metrics (pipeline/runner/metrics.py) as Prometheus scrapes them from Ray's metrics agent: a real
local Ray instance exporting on 127.0.0.1, real jobs with the tiny model, and each run's stats.json as the
reference (docs/cluster.md section 5 lists the metrics). And recording never fails a run."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runner.metrics import METRICS, RunMetrics
from pipeline.runner.worker import ProgressBoard
from tests.runner.test_job import make_job, write_prompts
from tests.support.metrics_run import samples, total

ROOT = Path(__file__).resolve().parents[2]

CLEAN, RETRIED = "metrics-clean", "metrics-retried"


def clean_job(tmp: Path):
    """Every kind of row: read and tokenize errors, rows the postprocess rejects or filters out, two completions
    per prompt; 2 workers."""
    data = write_prompts(tmp / "clean.jsonl", 16, extra=["{broken", json.dumps({"prompt": "x" * 200})])
    job = make_job(tmp, data, model__max_prompt_tokens=64, sampler__completions_per_prompt=2)
    job.run.id = CLEAN
    job.postprocess = {"_target_": "tests.runner.postprocess_fns.reject_or_filter"}
    return job


def retried_job(tmp: Path):
    """One worker, shards of 2; it dies on row 7 the first time (with the other shard it holds), and those
    shards commit on their second attempt."""
    data = write_prompts(tmp / "retried.jsonl", 12)
    lines = Path(data).read_text().splitlines()
    lines[7] = json.dumps({"prompt": "Sort: 1 2 CRASH"})
    Path(data).write_text("\n".join(lines) + "\n")
    job = make_job(tmp, data, cluster__num_workers=1, run__shard_size=2, run__max_shard_attempts=2)
    job.run.id = RETRIED
    job.postprocess = {
        "_target_": "tests.support.crashers.crash_once_on",
        "marker": "CRASH",
        "flag": str(tmp / "crashed"),
    }
    return job


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Both runs' stats.json and the scrape taken once their commits were exported."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "jobs.pkl").write_bytes(pickle.dumps([clean_job(tmp), retried_job(tmp)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.support.metrics_run", str(tmp)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    assert result["codes"] == {CLEAN: 0, RETRIED: 0}, run.stderr[-3000:]
    stats = {
        run_id: json.loads((tmp / "out" / run_id / "stats.json").read_text()) for run_id in result["codes"]
    }
    return stats, result["metrics"]


def metric(text: str, name: str, run_id: str, **labels: str) -> float:
    return total(text, f"ray_{name}", run_id=run_id, **labels)


def exported(text: str) -> list[str]:
    """The canvasflow metrics of a scrape, for a failing test's message."""
    return sorted({name for name, _, _ in samples(text) if name.startswith("ray_canvasflow_")})


@pytest.mark.ray
def test_committed_metrics_are_the_runs_stats(scraped):
    stats, text = scraped
    s = stats[CLEAN]
    shards = s["shards"]["total"]
    assert shards > 2 and s["rows_error"] and s["rows_filtered"]  # the job has every kind of row
    assert metric(text, "canvasflow_shards_committed_total", CLEAN) == shards, exported(text)
    assert metric(text, "canvasflow_shards_committed_total", CLEAN, retried="true") == 0
    assert metric(text, "canvasflow_input_rows_total", CLEAN) == s["rows_in"] == 18
    assert metric(text, "canvasflow_output_rows_total", CLEAN) == s["rows_out"]
    assert metric(text, "canvasflow_filtered_rows_total", CLEAN) == s["rows_filtered"]
    assert metric(text, "canvasflow_completion_tokens_total", CLEAN) == s["tokens_generated"]
    assert metric(text, "canvasflow_decoder_passes_total", CLEAN) == s["denoising_steps"]
    stages = {
        tags["stage"]
        for name, tags, _ in samples(text)
        if name == "ray_canvasflow_error_rows_total" and tags.get("run_id") == CLEAN
    }
    assert stages == set(s["errors_by_stage"]) == {"read", "tokenize", "postprocess"}
    for stage, rows in s["errors_by_stage"].items():
        assert metric(text, "canvasflow_error_rows_total", CLEAN, stage=stage) == rows
    assert metric(text, "canvasflow_shard_seconds_count", CLEAN) == shards
    assert metric(text, "canvasflow_shard_seconds_bucket", CLEAN, le="+Inf") == shards
    # by worker, as stats.json's per_worker says
    per_worker = s["this_invocation"]["per_worker"]
    assert set(per_worker) == {"w0", "w1"}
    for worker, w in per_worker.items():
        assert metric(text, "canvasflow_shards_committed_total", CLEAN, worker=worker) == w["shards"]
        assert metric(text, "canvasflow_output_rows_total", CLEAN, worker=worker) == w["rows"]
        assert metric(text, "canvasflow_completion_tokens_total", CLEAN, worker=worker) == w["tokens"]
    assert metric(text, "canvasflow_shard_attempts_failed_total", CLEAN) == 0


@pytest.mark.ray
def test_sampled_metrics_are_the_samplers_work_including_rows_dropped_after_sampling(scraped):
    stats, text = scraped
    s = stats[CLEAN]
    dropped = s["dropped_after_sampling"]
    assert dropped["rows"]  # the postprocess stage dropped rows the samplers generated
    assert metric(text, "canvasflow_rows_done_total", CLEAN) == s["rows_in"]
    assert metric(text, "canvasflow_sampled_completions_total", CLEAN) == s["rows_out"] + dropped["rows"]
    assert metric(text, "canvasflow_sampled_tokens_total", CLEAN) == s["tokens_generated"] + dropped["tokens"]
    assert (
        metric(text, "canvasflow_sampled_decoder_passes_total", CLEAN)
        == s["denoising_steps"] + dropped["denoising_steps"]
    )
    counters = s["this_invocation"]["sampler"]["counters"]
    assert metric(text, "canvasflow_sampler_passes_total", CLEAN) == counters["decoder_calls"]
    assert metric(text, "canvasflow_sampler_rows_computed_total", CLEAN) == counters["decoder_row_steps"]


@pytest.mark.ray
def test_a_shard_retried_after_its_worker_died_is_committed_once_and_its_lost_attempt_counted(scraped):
    stats, text = scraped
    s = stats[RETRIED]
    retried = s["shards"]["retried"]
    assert retried >= 1 and s["shards"]["failed"] == []
    assert metric(text, "canvasflow_shards_committed_total", RETRIED) == s["shards"]["total"] == 6
    assert metric(text, "canvasflow_shards_committed_total", RETRIED, retried="true") == retried
    assert metric(text, "canvasflow_input_rows_total", RETRIED) == s["rows_in"] == 12
    assert metric(text, "canvasflow_output_rows_total", RETRIED) == s["rows_out"] == 12
    assert metric(text, "canvasflow_completion_tokens_total", RETRIED) == s["tokens_generated"]
    assert metric(text, "canvasflow_decoder_passes_total", RETRIED) == s["denoising_steps"]
    # each shard the dead worker held: one attempt lost, then committed on its second
    assert metric(text, "canvasflow_shard_attempts_failed_total", RETRIED, reason="worker_died") == retried
    assert metric(text, "canvasflow_shard_attempts_failed_total", RETRIED) == retried
    assert metric(text, "canvasflow_shards_failed_total", RETRIED) == 0


def test_recording_goes_through_without_a_metrics_agent():
    """In a process without Ray (or beside a Ray without metrics agent), ray.util.metrics records into nothing."""
    board = ProgressBoard("r")
    board.report("w0", 2.0, 30, 12, 2, "w0:host:1", {"decoder_calls": 6, "decoder_row_steps": 12})
    commit = {"worker": "w0", "rows": 2, "errors_by_stage": {"read": 1}, "filtered": 0, "tokens": 30}
    board.committed({**commit, "denoising_steps": 12, "wall_s": 1.5, "attempt": 2}, 3)
    board.attempt_failed("w0", "worker_died")
    board.shards_failed(1)
    assert board.metrics._metrics is not None and set(board.metrics._metrics) == set(METRICS)


def test_a_failing_metric_turns_recording_off_with_one_debug_line_and_never_fails_the_run(caplog):
    class Broken:
        def inc(self, value, tags=None):
            raise RuntimeError("the metrics agent is gone")

    metrics = RunMetrics("r")
    metrics._metrics["canvasflow_rows_done"] = Broken()
    with caplog.at_level(logging.DEBUG, logger="pipeline.runner.metrics"):
        metrics.progress("w0", 1.0, 10, 4, 1)
        metrics.progress("w0", 1.0, 10, 4, 1)
        metrics.attempt_failed("w0", "error")
    lines = [r for r in caplog.records if r.name == "pipeline.runner.metrics"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG, lines
    assert "canvasflow metrics are off for run r: RuntimeError: the metrics agent is gone" in lines[0].message
    assert RunMetrics(None)._metrics is None, "a board without a run id (tests) records nothing"
