"""Where a run stands, from its directory alone: `python jobs/status.py <output.uri>/<run.id>`.

A run on a cluster is watched through its driver's log, which a user away from the cluster (a laptop, a
dashboard, the next morning) does not have. Everything needed is in the run directory: the identity and shard
plan (`_run.json`), the commit markers (rows, tokens and times of every committed shard), `_SUCCESS`, and the
run lock (`_lock`: its holder, when it took the lock, its last heartbeat). Reading them takes small GETs (the
markers 16 at a time; a complete run's totals come from its stats.json), never the data parts or the input;
nothing is written. Given an output location instead,
it lists the folders directly below it (one level, not every part) and reports each run there.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any

from pipeline.config.schema import ConfigError
from pipeline.io.commit import RUN_FILE, RUN_LOCK, SUCCESS, RunConflictError, RunStore
from pipeline.io.lease import holder_age_s, holder_is_stale, read_holder
from pipeline.io.s3 import S3Store
from pipeline.io.store import LocalStore, S3Options, Store, StoreError, is_s3
from pipeline.runner.job import RUN_LOCK_STALE_S  # a lock holder silent this long is not running
from pipeline.runner.report import format_duration

# A status check answers in seconds or says why not: fewer, shorter attempts than a job's (S3Options' defaults).
STATUS_S3 = {"max_attempts": 3, "connect_timeout_s": 3.0, "read_timeout_s": 15.0, "max_delay_s": 2.0}


class NoRun(LookupError):
    """The location holds no _run.json."""


class Unreadable(RuntimeError):
    """The location holds a run whose _run.json does not read as one."""


def run_status(store: Store) -> dict[str, Any]:
    """The state of the run at `store`: identity, shards committed, rows, tokens, errors, its lock holder,
    and while it runs its rate and ETA. NoRun when there is no _run.json, Unreadable when it is not a run's."""
    run_id = store.uri.rstrip("/").rsplit("/", 1)[-1]
    run_store = RunStore(store, run_id)
    try:
        identity = run_store.read_run_file()
    except RunConflictError as e:
        raise Unreadable(str(e)) from None
    if identity is None:
        raise NoRun(f"{store.describe(RUN_FILE)} does not exist")
    total = identity.get("num_shards")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise Unreadable(f"{store.describe(RUN_FILE)} has no shard count (num_shards={total!r})")
    complete = store.exists(SUCCESS)
    totals = _final_totals(store) if complete else None
    commits = [] if totals else sorted(run_store.committed().values(), key=lambda c: c.committed_at)
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
        **(totals or _totals(commits)),
        "created_at": identity.get("created_at"),
    }
    if holder is not None:
        status["lock"] = {
            "host": holder.get("host"),
            "pid": holder.get("pid"),
            "live": live,
            "heartbeat_age_s": round(holder_age_s(store, RUN_LOCK, holder), 1),
        }
    if status["state"] == "running":
        status.update(_rate(holder, commits, total))
    return status


def _totals(commits: list) -> dict[str, Any]:
    """What the commit markers (`commits`, oldest first) add up to."""
    return {
        "shards_committed": len(commits),
        "rows_out": sum(c.rows for c in commits),
        "rows_error": sum(c.error_rows for c in commits),
        "tokens": sum(c.tokens for c in commits),
        "errors_by_stage": dict(sum((Counter(c.errors_by_stage) for c in commits), Counter())),
        "last_commit_at": commits[-1].committed_at if commits else None,
    }


def _final_totals(store: Store) -> dict[str, Any] | None:
    """A complete run's totals from its stats.json, written from every marker when it completed: one GET
    instead of one per shard (a status of an output location read every marker of every run, 31 s for 11,000
    on S3). None when stats.json is missing, unreadable, or from before it recorded last_commit_at: the
    markers are read then."""
    try:
        stats = json.loads(store.read_text("stats.json"))
        totals = {
            "shards_committed": stats["shards"]["committed"],
            "rows_out": stats["rows_out"],
            "rows_error": stats["rows_error"],
            "tokens": stats["tokens_generated"],
            "errors_by_stage": stats["errors_by_stage"],
            "last_commit_at": stats["last_commit_at"],
        }
    except (StoreError, ValueError, TypeError, KeyError):
        return None
    counts = [totals[k] for k in ("shards_committed", "rows_out", "rows_error", "tokens")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        return None
    if not isinstance(totals["errors_by_stage"], dict) or _number(totals["last_commit_at"]) is None:
        return None
    return totals


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rate(holder: dict, commits: list, total: int) -> dict[str, Any]:
    """Shards per hour of the invocation holding the lock, from when it took the lock to its last heartbeat or
    commit (the cluster's clocks, not this machine's), and the ETA of the shards left at that rate. None for
    both until it has committed a shard, or for a lock written before locks recorded `acquired_at`."""
    since = _number(holder.get("acquired_at"))
    recent = [c for c in commits if since is not None and c.committed_at >= since]
    if not recent:
        return {"shards_per_hour": None, "eta_s": None}
    end = max(recent[-1].committed_at, _number(holder.get("heartbeat_at")) or 0.0)
    rate = len(recent) / max(end - since, 1e-9)
    left = total - len(commits)
    return {"shards_per_hour": round(rate * 3600, 2), "eta_s": round(left / rate, 1)}


def list_runs(store: Store) -> list[str]:
    """The folders directly below an output location that hold a _run.json (or a broken one)."""
    return [name for name in store.folders() if store.child(name).exists(RUN_FILE)]


def describe(status: dict[str, Any]) -> list[str]:
    """Lines for a person."""
    if status["state"] == "unreadable":
        return [f"run {status['run_id']} at {status['uri']}: unreadable: {status['error']}"]
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
        state = (
            "live"
            if lock["live"]
            else "stale: silent too long, or its process is gone; a rerun takes it over"
        )
        lines.append(
            f"  lock: host {lock['host']}, pid {lock['pid']}, heartbeat {lock['heartbeat_age_s']:.0f}s ago ({state})"
        )
    if status.get("shards_per_hour"):
        lines.append(
            f"  rate: {status['shards_per_hour']:.1f} shards/hour since this invocation took the run, "
            f"ETA {format_duration(status['eta_s'])}"
        )
    if status["state"] == "stopped":
        lines.append("  not running: rerun the same command to resume it (committed shards are kept)")
    if status["last_commit_at"]:
        lines.append(f"  last commit: {time_text(status['last_commit_at'])}")
    return lines


def time_text(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def open_location(uri: str, endpoint_url: str | None, region: str | None) -> Store:
    """The store at `uri`, checked as the jobs check output.uri; ConfigError naming the bad value."""
    from pipeline.config.validate import check_endpoint, check_location

    check_location("uri", uri)
    check_endpoint("--endpoint-url", endpoint_url)
    if is_s3(uri):
        return S3Store(uri, S3Options(endpoint_url=endpoint_url, region=region, **STATUS_S3))
    return LocalStore(uri)


def statuses(store: Store) -> dict[str, Any] | list[dict[str, Any]]:
    """The run at `store`, or (a list) every run directly below it; NoRun when there is neither."""
    try:
        return run_status(store)
    except NoRun:
        runs = list_runs(store)
        if not runs:
            raise NoRun(f"no {RUN_FILE} there, nor in a folder directly below it") from None
    found = []
    for name in runs:
        child = store.child(name)
        try:
            found.append(run_status(child))
        except (NoRun, Unreadable, StoreError) as e:  # one broken or vanishing run hides no other
            found.append({"run_id": name, "uri": child.uri, "state": "unreadable", "error": str(e)})
    return found


def main(uri: str, *, endpoint_url: str | None, region: str | None, as_json: bool) -> int:
    """Prints the status of the run at `uri`, or of every run directly below it; returns the exit code (2 with
    the reason on stderr when there is no run or the location cannot be read)."""
    try:
        result = statuses(open_location(uri, endpoint_url, region))
    except ConfigError as e:  # names the argument; `uri` itself may hold the credentials it refuses
        print(f"no status: {e}", file=sys.stderr)
        return 2
    except (NoRun, Unreadable, StoreError) as e:
        print(f"no status for {uri}: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for status in result if isinstance(result, list) else [result]:
        print("\n".join(describe(status)))
    return 0
