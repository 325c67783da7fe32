"""Application metrics of a run, in Prometheus format through Ray's metrics agent (docs/cluster.md section 5).

They are recorded in one process, the run's ProgressBoard actor (pipeline/runner/worker.py), from numbers it is
sent anyway: the workers' progress reports (about once a second per worker, never per sampler step) and, from
the driver, each shard commit and each failed shard attempt. Not in the workers themselves: a process sends
what it recorded to the agent every `metrics_report_interval_ms` (10 s by default), and a worker that dies (a
row that kills it, a lost node) takes what it recorded since then with it, commits included; the board
outlives the workers. Nor in the driver, which may be a Ray Client (cluster.address=ray://...) rather than a
process of the cluster.

Ray prefixes every application metric with `ray_` and exports a counter as `<name>_total`: the counter
canvasflow_output_rows is scraped as ray_canvasflow_output_rows_total. What each metric counts: METRICS below.

Recording never fails a run: where Ray has no metrics agent (a minimal Ray install, an agent that is down, no
Ray at all) ray.util.metrics records into nothing, and an error of its own turns recording off for the rest of
the run, with one debug line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.runner.report import sampler_passes

logger = logging.getLogger(__name__)

COUNTER, HISTOGRAM = "counter", "histogram"
RUN = ("run_id", "worker")
# The wall time of a shard, from its worker taking it to its commit: seconds to an hour.
SHARD_SECONDS_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0]

# name -> (type, tag keys, description). "Committed" metrics count this invocation's shard commits, each once
# (a shard retried after its worker died counts with the attempt that committed it): they add up to
# stats.json's totals for a run generated in one invocation. "Sampled" ones count the workers' work as they
# report it, including attempts that were lost (their rows are generated again) and rows the postprocess
# stage then dropped.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "canvasflow_shards_committed": (
        COUNTER,
        (*RUN, "retried"),
        "Shards committed (retried: whether an earlier attempt of the shard failed)",
    ),
    "canvasflow_input_rows": (
        COUNTER,
        RUN,
        "Input rows of the committed shards, each once (in data/ or errors/ now)",
    ),
    "canvasflow_output_rows": (COUNTER, RUN, "Rows committed to data/ (one per completion)"),
    "canvasflow_error_rows": (
        COUNTER,
        (*RUN, "stage"),
        "Rows committed to errors/, by the stage that rejected them (read, tokenize, postprocess, worker)",
    ),
    "canvasflow_filtered_rows": (
        COUNTER,
        RUN,
        "Rows the postprocess callable filtered out (in errors/ with stage postprocess)",
    ),
    "canvasflow_completion_tokens": (
        COUNTER,
        RUN,
        "Completion tokens of the rows committed to data/ (tokens)",
    ),
    "canvasflow_decoder_passes": (
        COUNTER,
        RUN,
        "Decoder passes (denoising steps) of the rows committed to data/, summed over rows",
    ),
    "canvasflow_shard_seconds": (
        HISTOGRAM,
        RUN,
        "Wall time of a committed shard, from its worker taking it to its commit (seconds)",
    ),
    "canvasflow_rows_done": (
        COUNTER,
        RUN,
        "Input rows done as the progress line counts them, lost attempts included (a completion is 1/n row)",
    ),
    "canvasflow_sampled_completions": (
        COUNTER,
        RUN,
        "Completions the samplers generated, lost attempts and rows dropped after sampling included",
    ),
    "canvasflow_sampled_tokens": (
        COUNTER,
        RUN,
        "Completion tokens the samplers generated, lost attempts and rows dropped after sampling included "
        "(tokens)",
    ),
    "canvasflow_sampled_decoder_passes": (
        COUNTER,
        RUN,
        "Decoder passes of the completions the samplers generated, summed over completions (row-passes)",
    ),
    "canvasflow_sampler_passes": (
        COUNTER,
        RUN,
        "Batched passes the samplers ran (decoder calls; LLaDA / Dream: sampler steps)",
    ),
    "canvasflow_sampler_rows_computed": (
        COUNTER,
        RUN,
        "Rows computed in the samplers' batched passes, summed over passes (padding rows included)",
    ),
    "canvasflow_shard_attempts_failed": (
        COUNTER,
        (*RUN, "reason"),
        "Shard attempts that did not commit (reason: error, worker_died, device_failed, timeout, not_started)",
    ),
    "canvasflow_shards_failed": (
        COUNTER,
        ("run_id",),
        "Shards that failed: given up on after run.max_shard_attempts, or not started once the output refused "
        "writes (rerun the job to retry them)",
    ),
}


def _build() -> dict[str, Any]:
    from ray.util.metrics import Counter, Histogram

    built = {}
    for name, (kind, tags, description) in METRICS.items():
        if kind == HISTOGRAM:
            built[name] = Histogram(name, description, boundaries=SHARD_SECONDS_BUCKETS, tag_keys=tags)
        else:
            built[name] = Counter(name, description, tag_keys=tags)
    return built


class RunMetrics:
    """The metrics of run `run_id`, tagged with it and the worker's name (w0, w1, ...); none without a run id
    (a ProgressBoard of a test)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._metrics: dict[str, Any] | None = None
        self._sampler: dict[str, tuple[int, int]] = {}  # per worker actor: passes, rows computed reported
        if run_id is None:
            return
        try:
            self._metrics = _build()
        except Exception as e:  # noqa: BLE001 - metrics are an extra: they never fail the run
            self._off(e)

    def _off(self, error: Exception) -> None:
        self._metrics = None
        logger.debug(
            "canvasflow metrics are off for run %s: %s: %s", self.run_id, type(error).__name__, error
        )

    def _guarded(self, record: Callable[[], None]) -> None:
        if self._metrics is None:
            return
        try:
            record()
        except Exception as e:  # noqa: BLE001 - as in __init__
            self._off(e)

    def _add(self, name: str, value: float, worker: str, **tags: str) -> None:
        if value > 0:  # a Ray counter refuses 0
            self._metrics[name].inc(value, {"run_id": self.run_id, "worker": worker, **tags})

    def progress(
        self,
        worker: str,
        rows: float,
        tokens: int,
        steps: int,
        sampled: int,
        instance: str | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        """A worker's report (ProgressBoard.report): what it did since its last one, and its sampler's
        counters so far in the actor `instance`, of which the passes since that actor's last report count."""

        def record() -> None:
            self._add("canvasflow_rows_done", rows, worker)
            self._add("canvasflow_sampled_completions", sampled, worker)
            self._add("canvasflow_sampled_tokens", tokens, worker)
            self._add("canvasflow_sampled_decoder_passes", steps, worker)
            if instance is not None and counters is not None:
                passes, computed = (count or 0 for count in sampler_passes(counters))
                passes_before, computed_before = self._sampler.get(instance, (0, 0))
                self._sampler[instance] = (max(passes, passes_before), max(computed, computed_before))
                self._add("canvasflow_sampler_passes", passes - passes_before, worker)
                self._add("canvasflow_sampler_rows_computed", computed - computed_before, worker)

        self._guarded(record)

    def committed(self, commit: dict[str, Any], input_rows: int) -> None:
        """A shard committed (`commit`: its marker's fields, pipeline.io.commit.ShardCommit)."""

        def record() -> None:
            worker = str(commit["worker"])
            self._add("canvasflow_input_rows", input_rows, worker)
            self._add("canvasflow_output_rows", commit["rows"], worker)
            for stage, count in sorted(commit.get("errors_by_stage", {}).items()):
                self._add("canvasflow_error_rows", count, worker, stage=str(stage))
            self._add("canvasflow_filtered_rows", commit.get("filtered", 0), worker)
            self._add("canvasflow_completion_tokens", commit["tokens"], worker)
            self._add("canvasflow_decoder_passes", commit["denoising_steps"], worker)
            self._metrics["canvasflow_shard_seconds"].observe(
                float(commit["wall_s"]), {"run_id": self.run_id, "worker": worker}
            )
            retried = "true" if commit.get("attempt", 1) > 1 else "false"
            self._add("canvasflow_shards_committed", 1, worker, retried=retried)

        self._guarded(record)

    def attempt_failed(self, worker: str, reason: str) -> None:
        self._guarded(lambda: self._add("canvasflow_shard_attempts_failed", 1, worker, reason=reason))

    def shards_failed(self, count: int) -> None:
        def record() -> None:
            if count > 0:
                self._metrics["canvasflow_shards_failed"].inc(count, {"run_id": self.run_id})

        self._guarded(record)
