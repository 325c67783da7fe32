"""Progress lines while a job runs, and the run's stats.json, manifest and end-of-run summary."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from typing import Any

logger = logging.getLogger("canvasflow")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def shard_rows(shard: int, shard_size: int, num_rows: int) -> int:
    """Input rows of shard `shard` in a plan of `num_rows` rows cut in shards of `shard_size`."""
    return min(num_rows, (shard + 1) * shard_size) - shard * shard_size


class Progress:
    """Logs rows done, rows/s, tokens/s, ETA and per-worker counts every `interval_s` seconds. Rows are input
    rows: a prompt with several completions counts once (workers report each completion as a fraction); decoder
    passes are per completion sampled ("passes/row" with one completion per prompt, "passes/completion" with
    several), rows rejected before sampling not counted.

    rows/s is this invocation's average; the ETA comes from the rate of the last `window_s` seconds, so that
    neither the workers' start nor a stall hides in it (a run stalled at 2960/3000 rows showed ETA 0:00:07 for
    minutes). When no row was done for `window_s` the ETA is "-" and the line says for how long."""

    def __init__(
        self, total_rows: int, done_rows: int, interval_s: float, completions: int = 1, clock=time.monotonic
    ) -> None:
        self.total = total_rows
        self.completions = completions
        self.done_before = done_rows
        self.interval = interval_s
        self.board = None
        self.ray = None
        self.committed_rows = 0
        self.committed_shards: set[int] = set()
        # per worker: rows, tokens, passes, completions sampled; per shard: rows its latest attempt reported
        self.snapshot: dict[str, dict[str, float]] = {}
        self.shards: dict[int, float] = {}
        self.logged: tuple[int, int] | None = None  # rows done and tokens of the last line logged
        self.clock = clock
        self.window_s = max(120.0, 12 * interval_s)
        self.samples: deque[tuple[float, int]] = deque()  # (time, rows done) of the lines of the last window
        self.started = self.last = self.moved_at = clock()  # moved_at: when rows done last grew
        self.last_done = done_rows

    def start(self, ray, board) -> None:
        self.ray, self.board = ray, board
        self.started = self.last = self.moved_at = self.clock()
        self.samples.clear()

    def _eta(self, now: float, done: int) -> tuple[float, float]:
        """(seconds left at the rate of the last window, seconds since rows done last grew)."""
        if done > self.last_done:  # rows of a failed attempt dropped, then done again, count as movement
            self.moved_at = now
        self.last_done = done
        self.samples.append((now, done))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()  # the oldest kept is the window's base: at or before its start
        since, base = self.samples[0]
        if now - self.started <= self.window_s or since == now:
            since, base = self.started, self.done_before
        rate = (done - base) / max(now - since, 1e-9)
        return ((self.total - done) / rate if rate > 0 else float("inf")), now - self.moved_at

    def shard_done(self, shard: int, input_rows: int) -> None:
        """Shard `shard`, of `input_rows` input rows, was committed."""
        self.committed_shards.add(shard)
        self.committed_rows += input_rows

    def _refresh(self) -> None:
        if self.board is None:
            return
        with contextlib.suppress(Exception):  # progress is best effort; the job goes on
            board = self.ray.get(self.board.snapshot.remote(), timeout=5)
            self.snapshot, self.shards = board["workers"], board["shards"]

    def tick(self, force: bool = False, *, if_changed: bool = False) -> None:
        """Logs the progress line (every `interval_s`, or at once with `force`); `if_changed`: not when rows and
        tokens are those of the last line logged."""
        now = self.clock()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        self._refresh()
        # Rows done: the committed shards' and those the latest attempt of each other shard reported, not those
        # of attempts that failed (a retried shard's rows counted twice or more: 100% and ETA 0:00:00 while a
        # shard was still being retried). Round first: n completions of a row are reported as n shares of 1/n,
        # whose float sum can fall short of 1.
        running = sum(rows for shard, rows in self.shards.items() if shard not in self.committed_shards)
        left = self.total - self.done_before - self.committed_rows
        rows = self.committed_rows + max(0, min(int(round(running, 6)), left))
        tokens = sum(w["tokens"] for w in self.snapshot.values())
        steps = sum(w["steps"] for w in self.snapshot.values())
        sampled = sum(w.get("sampled", 0) for w in self.snapshot.values())
        elapsed = max(now - self.started, 1e-9)
        done = self.done_before + rows
        rate = rows / elapsed
        eta, still_s = self._eta(now, done)
        stalled = done < self.total and still_s >= self.window_s
        # rounded as the total is: 24 shares of 1/3 sum to 7.999..., which int() made 7 rows
        workers = ", ".join(
            f"{name}: {int(round(w['rows'], 6))} rows" for name, w in sorted(self.snapshot.items())
        )
        if if_changed and self.logged == (done, tokens):
            return
        self.logged = (done, tokens)
        logger.info(
            "progress: %d/%d rows (%.1f%%) | %.2f rows/s | %.1f tok/s | %.1f passes/%s | ETA %s%s%s",
            done,
            self.total,
            100.0 * done / max(self.total, 1),
            rate,
            tokens / elapsed,
            steps / max(sampled, 1),
            "row" if self.completions == 1 else "completion",
            "-" if stalled or eta == float("inf") else format_duration(eta),
            f" (no row done for {format_duration(still_s)})" if stalled else "",
            f" | {workers}" if workers else "",
        )

    def final(self) -> None:
        self.tick(force=True, if_changed=True)


def sampler_counters(ray, workers, board) -> dict[str, int]:
    """The sampler work counters of every worker actor of this invocation, summed, with `workers`: how many
    actors. Live workers answer (ShardWorker.sampler_counters); a worker that died or was replaced counts with
    the counters it last sent the progress board (with its rows, about once a second). Best effort, as
    progress is."""
    snapshots: dict[str, dict[str, int]] = {}
    with contextlib.suppress(Exception):
        snapshots.update(ray.get(board.sampler_counters.remote(), timeout=10))
    for worker in workers:
        with contextlib.suppress(Exception):
            answer = ray.get(worker.sampler_counters.remote(), timeout=10)
            snapshots[answer["instance"]] = answer["counters"]
    total: Counter[str] = Counter()
    for counters in snapshots.values():
        total.update(counters)
    return {**total, "workers": len(snapshots)} if snapshots else {}


def sampler_summary(counters: dict[str, int], row_passes: int, batch_size: int) -> dict[str, Any] | None:
    """stats.json's `this_invocation.sampler`: the counters and how full the batch ran. `row_passes`: decoder
    passes of the completions this invocation committed (rows of failed attempts count only in `computed`)."""
    if not counters:
        return None
    summary: dict[str, Any] = {"counters": counters, "batch_size": batch_size}
    calls, computed = sampler_passes(counters)
    if calls and computed is not None:
        summary["computed_rows_per_pass"] = round(computed / calls, 3)  # padding and finished rows included
        summary["live_rows_per_pass"] = round(min(row_passes, computed) / calls, 3)
    if counters.get("query_tokens"):
        summary["valid_token_share"] = round(counters["valid_query_tokens"] / counters["query_tokens"], 4)
    return summary


def sampler_passes(counters: dict[str, int]) -> tuple[int | None, int | None]:
    """(batched passes, rows computed in them): the DiffusionGemma sampler's decoder calls, or the mask
    sampler's steps (a step may run two forwards, the rows that recompute their window and the cached ones)."""
    if "decoder_calls" in counters:
        return counters["decoder_calls"], counters.get("decoder_row_steps")
    return counters.get("steps"), counters.get("step_rows")


def _sampler_line(summary: dict[str, Any]) -> str | None:
    counters = summary["counters"]
    if "live_rows_per_pass" not in summary:
        return None
    calls, _ = sampler_passes(counters)
    line = (
        f"sampler: {calls} batched passes, {summary['live_rows_per_pass']:.1f} live rows per pass of "
        f"sampler.batch_size={summary['batch_size']} ({summary['computed_rows_per_pass']:.1f} computed)"
    )
    if "encoder_tokens" in counters:
        line += (
            f"; prompts: {counters['encoder_tokens']} tokens encoded, {counters['prompt_tokens_shared']} copied "
            "from rows holding the same leading text"
        )
    if "valid_token_share" in summary:
        line += f"; {100 * summary['valid_token_share']:.0f}% of the tokens computed were not padding"
    return line


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    return dict(total)


def _attr(commit, name: str):
    return commit[name] if isinstance(commit, dict) else getattr(commit, name, 0)


def _busy_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) spans: a worker holding two shards is busy once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _per_worker(commits) -> dict[str, dict[str, float]]:
    per_worker: dict[str, dict[str, float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for c in commits:
        name = _attr(c, "worker")
        w = per_worker.setdefault(name, {"shards": 0, "rows": 0, "error_rows": 0, "tokens": 0, "busy_s": 0.0})
        w["shards"] += 1
        w["rows"] += _attr(c, "rows")
        w["error_rows"] += _attr(c, "error_rows")
        w["tokens"] += _attr(c, "tokens")
        end = _attr(c, "committed_at")
        start = _attr(c, "started_at") or end - _attr(c, "wall_s")  # markers from before started_at
        spans.setdefault(name, []).append((start, end))
    for name, w in per_worker.items():
        w["busy_s"] = round(_busy_s(spans[name]), 3)
        w["tokens_per_s"] = round(w["tokens"] / w["busy_s"], 2) if w["busy_s"] else 0.0
    return per_worker


def build_stats(
    prep, all_commits: dict, new_commits: dict, worker_infos, started: float, failed, counters=None
) -> dict[str, Any]:
    """The run's stats.json. Top-level figures describe the run as committed (data/ and errors/, every
    invocation); `this_invocation` only what this process committed; `dropped_after_sampling` the sampler's
    work on rows the postprocess stage filtered out or rejected (in errors/, counted in no data/ total)."""
    commits = list(all_commits.values())
    rows_out = sum(c.rows for c in commits)
    tokens = sum(c.tokens for c in commits)
    steps = sum(c.denoising_steps for c in commits)
    canvases = sum(c.canvases for c in commits)
    wall = time.time() - started
    this_tokens = sum(c["tokens"] for c in new_commits.values())
    # input rows of the shards this invocation committed (with several completions per prompt, a shard's
    # output rows are more), as the progress line counts them
    size, total = prep.job.run.shard_size, prep.records.num_rows
    this_rows = sum(shard_rows(s, size, total) for s in new_commits)
    return {
        "run_id": prep.run_id,
        "model": prep.model_info.name,
        "rows_in": prep.records.num_rows,
        "completions_per_prompt": prep.spec.completions_per_prompt,
        "rows_out": rows_out,
        "rows_error": sum(c.error_rows for c in commits),
        "rows_filtered": sum(c.filtered for c in commits),
        "errors_by_stage": _merge([c.errors_by_stage for c in commits]),
        "last_commit_at": max(
            (c.committed_at for c in commits), default=None
        ),  # status reads it, not markers
        "finish_reasons": _merge([c.finish_reasons for c in commits]),
        "tokens_generated": tokens,  # completion tokens of the rows in data/
        "denoising_steps": steps,  # decoder passes of the rows in data/
        "canvases": canvases,
        "mean_steps_per_canvas": round(steps / canvases, 3) if canvases else None,
        "tokens_per_forward": round(tokens / steps, 3) if steps else None,
        "dropped_after_sampling": {
            "note": "rows the sampler ran that the postprocess stage filtered out or rejected (in errors/); "
            "not counted in rows_out, tokens_generated, denoising_steps or canvases",
            "rows": sum(c.dropped_rows for c in commits),
            "tokens": sum(c.dropped_tokens for c in commits),
            "denoising_steps": sum(c.dropped_denoising_steps for c in commits),
            "canvases": sum(c.dropped_canvases for c in commits),
        },
        "shards": {
            "total": prep.identity["num_shards"],
            "committed": len(all_commits),
            "committed_this_invocation": len(new_commits),
            "skipped_already_committed": len(all_commits) - len(new_commits),
            "failed": [t.shard for t in failed],
            "retried": sum(1 for c in new_commits.values() if c["attempt"] > 1),
        },
        "this_invocation": {
            "wall_time_s": round(wall, 3),
            "rows": this_rows,
            "tokens": this_tokens,
            "rows_per_s": round(this_rows / wall, 3) if wall else None,
            "tokens_per_s": round(this_tokens / wall, 3) if wall else None,
            # the shards this invocation's workers committed (`workers` below describes those actors)
            "per_worker": _per_worker(new_commits.values()),
            "sampler": sampler_summary(
                counters or {},
                sum(c["denoising_steps"] + c.get("dropped_denoising_steps", 0) for c in new_commits.values()),
                prep.spec.batch_size,
            ),
        },
        # Every committed shard of the run, by the name of the worker that committed it; each invocation
        # names its pool w0, w1, ... again, so after a resume a name covers the shards of every invocation.
        "per_worker": _per_worker(commits),
        "workers": worker_infos,  # the actors of this invocation
        "sampler": prep.settings,
    }


def build_manifest(prep, all_commits: dict) -> dict[str, Any]:
    from pipeline import __version__
    from pipeline.io.columns import ordered, read_run_columns

    parts = [vars(all_commits[s]) for s in sorted(all_commits)]
    columns = ordered(read_run_columns(prep.run_store.store))
    return {
        "run_id": prep.run_id,
        "canvasflow_version": __version__,
        "completed_at": time.time(),
        "model": prep.model_info.name,
        "model_family": prep.model_info.family,  # diffusion_gemma, llada or dream: what `sampler` holds
        "model_identity": prep.identity["model_identity"],
        # the dtype the run's workers load the model in (_run.json: model.dtype=auto resolved once per run);
        # null for a run completed before it was recorded
        "dtype": (prep.run_store.read_run_file() or {}).get("dtype"),
        "input": {
            "path": prep.job.data.path,
            "fingerprint": prep.records.fingerprint,
            "files": prep.records.files,
            "format": prep.records.format,
            "rows": prep.records.num_rows,
            "metadata_columns": prep.job.data.metadata_columns,  # carried in `metadata`; null: every other one
        },
        "config_fingerprint": prep.identity["config_fingerprint"],
        "sampler": prep.settings,
        "completions_per_prompt": prep.spec.completions_per_prompt,
        "shard_size": prep.job.run.shard_size,
        "compression": prep.job.output.compression,
        # the postprocess columns and their Arrow types, the same in every part
        "columns": [{"name": c.name, "type": str(c.type), "source": c.source} for c in columns],
        "parts": parts,
        "rows_out": sum(p["rows"] for p in parts),
        "rows_error": sum(p["error_rows"] for p in parts),
    }


def log_summary(stats: dict[str, Any], uri: str, *, ran: bool = True) -> None:
    """The closing lines; `ran=False` for a run found complete, whose stats' `this_invocation` is an earlier
    invocation's and is not reported as this one's. A run that this invocation finalized from shards committed
    before it (an earlier driver killed while it finalized) is not reported at 0 tok/s either."""
    inv = stats.get("this_invocation", {})
    committed_before = stats.get("shards", {}).get("skipped_already_committed", 0)
    if not ran:
        this_run = "completed earlier, nothing generated now"
    elif committed_before and not stats["shards"].get("committed_this_invocation"):
        this_run = (
            f"nothing generated now: finalized from the {committed_before} shard(s) committed earlier "
            f"({inv.get('wall_time_s', 0.0):.1f}s)"
        )
    else:
        this_run = f"{inv.get('wall_time_s', 0.0):.1f}s this run, {inv.get('tokens_per_s') or 0.0:.1f} tok/s"
    logger.info(
        "done: %d rows in -> %d rows out, %d rejected | %d tokens, %d decoder passes (%.2f tokens/pass) | %s",
        stats["rows_in"],
        stats["rows_out"],
        stats["rows_error"],
        stats["tokens_generated"],
        stats["denoising_steps"],
        stats["tokens_per_forward"] or 0.0,
        this_run,
    )
    sampler = inv.get("sampler") if ran else None
    line = _sampler_line(sampler) if sampler else None
    if line:
        logger.info("%s", line)
    dropped = stats.get("dropped_after_sampling") or {}
    if dropped.get("rows"):
        logger.info(
            "not in those totals: %d row(s) the postprocess stage filtered out or rejected after sampling "
            "(in errors/): %d tokens, %d decoder passes",
            dropped["rows"],
            dropped.get("tokens", 0),
            dropped.get("denoising_steps", 0),
        )
    base = uri.rstrip("/")
    # No output rows (data/ holds one part without rows, RunStore.write_empty_part): point at the rejected rows.
    if not stats["rows_out"]:
        logger.info(
            "output: no rows; the %d rejected row(s) and why are in %s/errors/ (dataset card: %s/README.md)",
            stats["rows_error"],
            base,
            base,
        )
        return
    logger.info("output: %s/data/ (dataset card: %s/README.md)", base, base)
