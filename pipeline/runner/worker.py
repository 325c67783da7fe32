"""The GPU stage: a Ray actor that loads the model once and turns shards of records into committed parts.

It follows Ray Data LLM's stage shape: heavy imports and model loading in `__init__` (once per actor, which
is why the driver keeps a fixed pool of them), then `process` per unit of work. Rows rejected while reading
the input are written to errors/ here too, so a shard's commit covers every one of its input rows.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)


class ProgressBoard:
    """A tiny Ray actor collecting per-worker counters; workers report, the driver reads. With `run_id`, it also
    records the run's metrics (pipeline/runner/metrics.py) from the workers' reports and the driver's calls."""

    def __init__(self, run_id: str | None = None) -> None:
        from pipeline.runner.metrics import RunMetrics

        self.metrics = RunMetrics(run_id)
        self.workers: dict[str, dict[str, float]] = {}
        self.counters: dict[str, dict[str, int]] = {}  # worker actor instance -> its sampler's counters
        # shard -> [its latest attempt, the rows that attempt reported]
        self.shards: dict[int, list[float]] = {}

    def report(
        self,
        worker: str,
        rows: float,
        tokens: int,
        steps: int,
        sampled: int,
        instance: str | None = None,
        counters: dict[str, int] | None = None,
        shards: dict[tuple[int, int], float] | None = None,
    ) -> None:
        """`rows`: input rows done (a completion is 1/n of one; rows rejected before sampling count whole);
        `sampled`: completions the sampler generated, whose `tokens` and decoder passes (`steps`) these are;
        `counters`: the sampler's work counters so far in the actor `instance` (kept when the actor dies);
        `shards`: the rows by (shard, attempt). A shard's later attempt replaces the count of its earlier ones,
        whose rows are done again."""
        self.metrics.progress(worker, rows, tokens, steps, sampled, instance, counters)
        if instance is not None and counters is not None:
            self.counters[instance] = counters
        for (shard, attempt), done in (shards or {}).items():
            latest = self.shards.setdefault(shard, [attempt, 0.0])
            if attempt > latest[0]:
                latest[:] = [attempt, 0.0]
            if attempt == latest[0]:
                latest[1] += done
        entry = self.workers.setdefault(
            worker, {"rows": 0, "tokens": 0, "steps": 0, "sampled": 0, "updated": 0.0}
        )
        entry["rows"] += rows
        entry["tokens"] += tokens
        entry["steps"] += steps
        entry["sampled"] += sampled
        entry["updated"] = time.time()

    def committed(self, commit: dict[str, Any], input_rows: int) -> None:
        """The driver: shard `commit["shard"]`, of `input_rows` input rows, was committed."""
        self.metrics.committed(commit, input_rows)

    def attempt_failed(self, worker: str, reason: str) -> None:
        """The driver: an attempt of a shard on `worker` did not commit (pool.run_pool's on_failure)."""
        self.metrics.attempt_failed(worker, reason)

    def shards_failed(self, count: int) -> None:
        """The driver: `count` shards were given up on."""
        self.metrics.shards_failed(count)

    def snapshot(self) -> dict[str, dict]:
        """Per worker its counters (`workers`), per shard the rows its latest attempt reported (`shards`)."""
        return {
            "workers": {k: dict(v) for k, v in self.workers.items()},
            "shards": {shard: rows for shard, (_, rows) in self.shards.items()},
        }

    def sampler_counters(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.counters.items()}


def start_errors() -> tuple[type[Exception], ...]:
    """The start-up failures that are the user's to fix, whose message says what is wrong and where (weights that
    do not match their config, a missing tokenizer, a postprocess that does not import, sampler settings the
    model refuses, a model location that cannot be read, a sampler.batch_size the device cannot hold): one line on the driver's console, not a traceback.
    Any other exception (a bug) still fails the actor's creation, which Ray reports with its traceback."""
    from pipeline.config.schema import ConfigError
    from pipeline.generation import SlotsDoNotFit
    from pipeline.io.store import StoreError
    from pipeline.models.loader import ModelError
    from pipeline.postprocess import PostprocessError
    from pipeline.sampler.settings import SettingsError

    return (ModelError, PostprocessError, SettingsError, ConfigError, StoreError, SlotsDoNotFit)


class ShardWorker:
    """Start-up failures in start_errors() do not fail the actor's creation: Ray would print the actor's whole
    traceback on the driver's console before the driver's own line naming the error. The worker keeps the error
    and every call raises it as WorkerNotStarted (pipeline/runner/pool.py), which the pool treats as it treats an
    actor whose creation failed: not replaced at the job's start, "its worker failed to start" later."""

    def __init__(
        self, spec, run_store, *, compression: str, name: str, torch_threads: int | None, board=None
    ):
        self.name = name
        self.instance = f"{name}:{socket.gethostname()}:{os.getpid()}"  # this actor; a replacement is another
        self.start_error: tuple[str, str] | None = None  # (the error in one line, its traceback)
        expected = start_errors()
        try:
            self._start(spec, run_store, compression, torch_threads, board)
        except expected as e:
            from pipeline.runner.pool import describe

            self.start_error = (describe(e), traceback.format_exc())
            logger.debug("worker %s failed to start", name, exc_info=True)

    def _start(self, spec, run_store, compression: str, torch_threads: int | None, board) -> None:
        import torch

        from pipeline.generation import Generator
        from pipeline.runner.stream import WORKER_SWITCH_INTERVAL_S, SharedSampler

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # The sampler shares this process with the Python work of the shards in flight: hand the GIL over often.
        sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
        self.run_store = run_store
        self.compression = compression
        self.board = board
        started = time.perf_counter()
        self.generator = Generator(spec)
        self.generator.reserve_memory()
        self.load_s = time.perf_counter() - started
        # Continuous batching runs the rows of every shard in flight here through one sampler (stream.py).
        self.shared = SharedSampler(self.generator.sampler) if spec.batching == "continuous" else None
        self._pending = [0, 0, 0, 0]
        self._pending_shards: Counter[tuple[int, int]] = Counter()  # rows by (shard, attempt)
        self._last_flush = time.monotonic()
        self._report_lock = threading.Lock()  # rows are reported from the sampler's and the shards' threads
        self._commit_lock = threading.Lock()

    def _check_started(self) -> None:
        """Raises WorkerNotStarted when this worker's start failed (start_errors())."""
        if self.start_error is not None:
            from pipeline.runner.pool import WorkerNotStarted

            raise WorkerNotStarted(*self.start_error)

    def ready(self) -> dict[str, Any]:
        import torch

        self._check_started()
        device = self.generator.loaded.model.device
        return {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "backend": self.generator.sampler.backend,
            "dtype": str(self.generator.loaded.model.dtype).removeprefix("torch."),
            "load_s": round(self.load_s, 2),
            "switch_interval_s": round(sys.getswitchinterval(), 6),
        }

    def sampler_counters(self) -> dict[str, Any]:
        """This actor's id and its sampler's work counters since the model loaded (SamplerStats or
        MaskSamplerStats): batched passes, rows computed in them (padding included), encoder tokens, prompt
        tokens copied. They also go to the progress board with every report (ProgressBoard.report)."""
        self._check_started()
        return {"instance": self.instance, "counters": dict(vars(self.generator.sampler.stats))}

    def _report(
        self,
        attempt: tuple[int, int],
        rows: float,
        tokens: int = 0,
        steps: int = 0,
        sampled: int = 0,
        force: bool = False,
    ) -> None:
        """Adds to this worker's counters on the progress board (ProgressBoard.report), sent once a second;
        `attempt`: the (shard, attempt) the rows belong to."""
        if self.board is None:
            return
        with self._report_lock:
            for i, value in enumerate((rows, tokens, steps, sampled)):
                self._pending[i] += value
            self._pending_shards[attempt] += rows
            now = time.monotonic()
            if force or now - self._last_flush > 1.0:
                if any(self._pending):
                    counters = dict(vars(self.generator.sampler.stats))
                    self.board.report.remote(
                        self.name, *self._pending, self.instance, counters, dict(self._pending_shards)
                    )
                self._pending = [0, 0, 0, 0]
                self._pending_shards.clear()
                self._last_flush = now

    def process(
        self, shard: int, records, attempt: int, skip: dict[int, str] | None = None, probe: bool = False
    ) -> dict[str, Any]:
        """Generates and commits one shard; `records` is an Arrow table in pipeline.data.records' schema.

        `skip`: position in `records` -> reason, rows that killed their worker (pipeline/runner/isolate.py),
        written as error rows instead of generated. `probe`: generate the rows only, to see whether one of
        them kills the worker; nothing is committed or reported as progress."""
        from pipeline.generation import PromptRecord

        self._check_started()
        started, started_at = time.perf_counter(), time.time()
        rows = records.to_pylist()
        skip = skip or {}
        early_errors, good = [], []  # rows rejected while reading or found to kill their worker; the rest
        for i, r in enumerate(rows):
            if r["error"] is not None:
                early_errors.append(self._error_row(r, "read", r["error"], r["raw"]))
            elif i in skip:
                early_errors.append(self._error_row(r, "worker", skip[i], r["prompt"][:2000]))
            else:
                good.append(
                    PromptRecord(r["id"], r["prompt"], bool(r["is_chat"]), r["source_index"], r["metadata"])
                )
        if probe:
            self.generator.generate(good, shared=self.shared)
            return {"shard": shard, "probe": True, "rows": len(good)}
        key = (shard, attempt)
        if early_errors:
            self._report(key, len(early_errors))
        share = 1 / self.generator.completions  # progress counts input rows: a completion is a share of one
        out = self.generator.generate(
            good, on_row=lambda tokens, steps: self._report(key, share, tokens, steps, 1), shared=self.shared
        )
        generated = sorted(out.rows, key=lambda r: r["source_index"])
        with self._commit_lock:
            table, generated, column_errors = self._table(shard, generated)
        errors = sorted(early_errors + out.errors + column_errors, key=lambda e: e["source_index"])
        # The totals describe data/ (the committed rows); `dropped_*` the rows the sampler ran that the
        # postprocess stage then filtered out or rejected (they are in errors/).
        tokens = sum(r["completion_tokens"] for r in generated)
        steps = sum(r["denoising_steps"] for r in generated)
        canvases = sum(r["canvases"] for r in generated)
        stats = {
            "tokens": tokens,
            "denoising_steps": steps,
            "canvases": canvases,
            "filtered": out.filtered,
            "dropped_rows": sum(1 for e in out.errors + column_errors if e["stage"] == "postprocess"),
            "dropped_tokens": out.tokens - tokens,
            "dropped_denoising_steps": out.denoising_steps - steps,
            "dropped_canvases": out.canvases - canvases,
            "wall_s": time.perf_counter() - started,
            "started_at": started_at,
            "finish_reasons": dict(Counter(r["finish_reason"] for r in generated)),
            "errors_by_stage": dict(Counter(e["stage"] for e in errors)),
        }
        # Rows rejected before sampling; those the postprocess rejected were counted as they finished.
        self._report(key, sum(1 for e in out.errors if e["stage"] != "postprocess"), force=True)
        with self._commit_lock:  # shards in flight commit one at a time, while the sampler goes on
            commit = self.run_store.commit_shard(
                shard,
                table,
                errors,
                compression=self.compression,
                stats=stats,
                worker=self.name,
                attempt=attempt,
            )
        return vars(commit)

    def _table(self, shard: int, rows: list[dict[str, Any]]):
        """The shard's Arrow table in the run's column types (pipeline/io/columns.py); rows whose postprocess
        values do not convert come back as error rows."""
        from pipeline.io.columns import conform_rows, declared_columns, fix_columns, part_schema
        from pipeline.io.parts import to_table

        store = self.run_store.store
        name = self.generator.postprocess_name
        run_columns = fix_columns(store, declared_columns(self.generator.postprocess_columns, name))
        # New columns are proposed first, then widenings (int64 -> double -> string, bool -> string; see
        # pipeline/io/columns.py): each round records some, so the third call converts at the latest.
        for _ in range(3):
            kept, bad, proposals = conform_rows(rows, run_columns, shard=shard, callable_name=name)
            if not proposals:
                break
            run_columns = fix_columns(store, proposals)
        else:
            raise RuntimeError(f"the postprocess column types of shard {shard} did not settle: {proposals}")
        several = self.generator.completions > 1  # name the completion, as Generator._error does
        errors = [
            self._error_row(
                row,
                "postprocess",
                f"completion {row['completion_index']}: {reason}" if several else reason,
                row["prompt"][:2000],
            )
            for row, reason in bad
        ]
        return to_table(kept, part_schema(kept, run_columns)), kept, errors

    def _error_row(self, row: dict[str, Any], stage: str, reason: str, raw: str) -> dict[str, Any]:
        """A row of errors/ (pipeline.io.parts.ERROR_SCHEMA) for input or output row `row`."""
        return {
            "id": row["id"],
            "source_index": row["source_index"],
            "stage": stage,
            "reason": reason,
            "raw": raw,
            "run_id": self.run_store.run_id,
        }
