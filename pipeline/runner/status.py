"""Where a run stands, from its directory alone: `python jobs/status.py <output.uri>/<run.id>`.

A run on a cluster is watched through its driver's log, which a user away from the cluster (a laptop, a
dashboard, the next morning) does not have. Everything needed is in the run directory: the identity and shard
plan (`_run.json`), the commit markers (rows, tokens and times of every committed shard), `_SUCCESS`, and the
run lock with its heartbeat (`_lock`). Reading them takes a listing and a few small GETs, never the data parts or
the input; nothing is written. Given an output location instead, it lists the runs there.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from pipeline.io.commit import RUN_FILE, RUN_LOCK, SUCCESS, RunConflictError, RunStore
from pipeline.io.lease import holder_age_s, holder_is_stale, read_holder
from pipeline.io.store import Store, StoreError
from pipeline.runner.job import RUN_LOCK_STALE_S  # a lock holder silent this long is not running
from pipeline.runner.report import format_duration

CONFIG = "_config.yaml"  # written by every invocation as it opens the run (job.open_run)


class NoRun(LookupError):
    """The location holds no canvasflow run (and, listed as an output location, no run below it)."""


def run_status(store: Store, now: float | None = None) -> dict[str, Any]:
    """The state of the run at `store`: identity, shards committed, rows, tokens, errors, its lock holder,
    and while it runs its rate and ETA from the commits' times. NoRun when there is no _run.json."""
    now = time.time() if now is None else now
    run_id = store.uri.rstrip("/").rsplit("/", 1)[-1]
    run_store = RunStore(store, run_id)
    try:
        identity = run_store.read_run_file()
    except RunConflictError as e:
        raise NoRun(str(e)) from None
    if identity is None:
        raise NoRun(f"{store.describe(RUN_FILE)} does not exist: {store.uri} is not a canvasflow run")
    commits = sorted(run_store.committed().values(), key=lambda c: c.committed_at)
    total = int(identity.get("num_shards", 0))
    complete = store.exists(SUCCESS)
    holder = read_holder(store, RUN_LOCK)
    live = holder is not None and not holder_is_stale(store, RUN_LOCK, holder, RUN_LOCK_STALE_S)
    status: dict[str, Any] = {
        "run_id": identity.get("run_id", run_id),
        "uri": store.uri,
        "state": "complete" if complete else "running" if live else "stopped",
        "input_path": identity.get("input_path"),
        "model": identity.get("model"),
        "rows_in": identity.get("num_rows"),
        "shards_total": total,
        "shards_committed": len(commits),
        "rows_out": sum(c.rows for c in commits),
        "rows_error": sum(c.error_rows for c in commits),
        "tokens": sum(c.tokens for c in commits),
        "errors_by_stage": dict(sum((Counter(c.errors_by_stage) for c in commits), Counter())),
        "created_at": identity.get("created_at"),
        "last_commit_at": commits[-1].committed_at if commits else None,
    }
    if holder is not None:
        status["lock"] = {
            "host": holder.get("host"),
            "pid": holder.get("pid"),
            "heartbeat_age_s": round(holder_age_s(store, RUN_LOCK, holder), 1),
        }
    if status["state"] == "running":
        status.update(_rate(store, commits, total, now))
    return status


def _rate(store: Store, commits: list, total: int, now: float) -> dict[str, Any]:
    """Shards per hour since this invocation opened the run (it wrote _config.yaml then), and the ETA of the
    shards left at that rate; an earlier invocation's commits do not count."""
    age = store.age_s(CONFIG)
    since = (
        now - age if age is not None else min((c.started_at or c.committed_at for c in commits), default=now)
    )
    recent = [c for c in commits if c.committed_at >= since]
    if not recent:
        return {"shards_per_hour": None, "eta_s": None}
    rate = len(recent) / max(now - since, 1e-9)
    left = total - len(commits)
    return {"shards_per_hour": round(rate * 3600, 2), "eta_s": round(left / rate, 1)}


def list_runs(store: Store) -> list[str]:
    """The run ids directly below an output location (folders holding a _run.json)."""
    return sorted(
        key.split("/", 1)[0] for key in store.list("") if key.count("/") == 1 and key.endswith(f"/{RUN_FILE}")
    )


def describe(status: dict[str, Any]) -> list[str]:
    """Lines for a person."""
    done, total = status["shards_committed"], status["shards_total"]
    lines = [
        f"run {status['run_id']} at {status['uri']}: {status['state']}, {done}/{total} shards committed "
        f"({100.0 * done / max(total, 1):.1f}%)",
        f"  rows: {status['rows_out']} out, {status['rows_error']} rejected, of {status['rows_in']} input rows; "
        f"{status['tokens']} tokens",
    ]
    if status["errors_by_stage"]:
        stages = ", ".join(f"{k}: {v}" for k, v in sorted(status["errors_by_stage"].items()))
        lines.append(f"  rejected by stage: {stages}")
    lock = status.get("lock")
    if lock:
        age = lock["heartbeat_age_s"]
        lines.append(
            f"  lock: host {lock['host']}, pid {lock['pid']}, heartbeat {age:.0f}s ago"
            + ("" if status["state"] == "running" else " (stale: its process is gone; a rerun takes it over)")
        )
    if status["state"] == "running" and status.get("shards_per_hour"):
        lines.append(
            f"  rate: {status['shards_per_hour']:.1f} shards/hour since this invocation started, "
            f"ETA {format_duration(status['eta_s'])}"
        )
    if status["state"] == "stopped":
        lines.append("  not running: rerun the same command to resume it (committed shards are kept)")
    if status["last_commit_at"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status["last_commit_at"]))
        lines.append(f"  last commit: {stamp}")
    return lines


def main(uri: str, *, endpoint_url: str | None, region: str | None, as_json: bool) -> int:
    """Prints the status of the run at `uri`, or of every run below it; returns the exit code."""
    from pipeline.io.store import open_store

    try:
        store = open_store(uri, endpoint_url=endpoint_url, region=region)
        try:
            statuses = [run_status(store)]
        except NoRun:
            runs = list_runs(store)
            if not runs:
                raise
            statuses = [run_status(store.child(run)) for run in runs]
    except NoRun:
        print(f"no canvasflow run at {uri}: no {RUN_FILE} there, nor in a folder directly below it")
        return 2
    except StoreError as e:
        print(f"cannot read {uri}: {e}")
        return 2
    if as_json:
        print(json.dumps(statuses if len(statuses) > 1 else statuses[0], indent=2, sort_keys=True))
    else:
        for status in statuses:
            print("\n".join(describe(status)))
    return 0
