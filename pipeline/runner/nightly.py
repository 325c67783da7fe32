"""Nightly runs: one run per scheduled date, resumed (never duplicated) when the night is retried.

    <output.uri>/nightly-2026-11-27/   the night's run (run id from the scheduled date in nightly.timezone)
    <output.uri>/LATEST                the newest night with _SUCCESS, updated only after it
    <output.uri>/_locks/nightly.lock   held while a night runs; refreshed by a heartbeat

Each nightly.run_prefix has its own lock and its own pointer (latest_key): LATEST for the default prefix
`nightly`, LATEST-<run_prefix> for any other (e.g. LATEST-code beside LATEST-math in one output.uri), so that
one dataset's nights never move, or are judged late by, another's.

A run is refused (exit code 3) when another live run holds the lock, or when it is late: a newer night is
already complete. A lock is taken over when its holder stopped heartbeating for `lock_stale_s`, or is a dead
process on this host (a crashed attempt of a retried night). A holder of the same night on another host (the
attempt before a retry, whose pod or head node died moments ago) is waited for, up to `lock_stale_s` + 60 s,
to go stale or release the lock; a retry is then not refused for starting too soon. The schedule's own concurrency policy
(CronJob `concurrencyPolicy: Forbid`) is the first line; the lock also covers manual runs and reschedules.
Retention deletes only complete runs older than `retention_days`, never the prefix's pointer's night or an
incomplete run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import secrets
import time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.config.schema import ConfigError, JobConfig, NightlyConfig
from pipeline.config.store import RESUME_NOTE, signals_deferred
from pipeline.config.validate import validate_nightly
from pipeline.io.commit import RUN_FILE, SUCCESS
from pipeline.io.lease import Lease, Refused, read_holder
from pipeline.io.store import Store, StoreError, open_store

logger = logging.getLogger("canvasflow")
REFUSED = 3
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def scheduled_date(nightly: NightlyConfig, now: dt.datetime | None = None) -> dt.date:
    try:
        zone = ZoneInfo(nightly.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"nightly.timezone={nightly.timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)"
        ) from None
    if nightly.date:
        validate_nightly(nightly)  # a real YYYY-MM-DD date, or ConfigError naming nightly.date
        return dt.date.fromisoformat(nightly.date)
    return (now or dt.datetime.now(dt.timezone.utc)).astimezone(zone).date()


def run_id_for(nightly: NightlyConfig, date: dt.date) -> str:
    return f"{nightly.run_prefix}-{date.isoformat()}"


def date_of(nightly: NightlyConfig, run_id: str) -> dt.date | None:
    prefix = f"{nightly.run_prefix}-"
    tail = run_id[len(prefix) :] if run_id.startswith(prefix) else ""
    if not DATE.match(tail):
        return None
    try:
        return dt.date.fromisoformat(tail)
    except ValueError:  # e.g. nightly-2026-02-30 made by hand: not a night of ours
        return None


DEFAULT_RUN_PREFIX = NightlyConfig.run_prefix  # "nightly": its pointer keeps the documented name LATEST


def latest_key(nightly: NightlyConfig) -> str:
    """The key, under output.uri, of the pointer to this prefix's newest complete night: LATEST for the
    default prefix, LATEST-<run_prefix> for any other (prefixes sharing one output.uri have one each)."""
    if nightly.run_prefix == DEFAULT_RUN_PREFIX:
        return "LATEST"
    return f"LATEST-{nightly.run_prefix}"


def _pointer(store: Store, key: str) -> tuple[dict | None, str | None, str]:
    """The pointer at `key`: (its document, its run id, its text); a bare run id is read as one."""
    text = store.read_text(key).strip()
    try:
        latest = json.loads(text)
    except ValueError:
        latest = {"run_id": text}
    run_id = latest.get("run_id") if isinstance(latest, dict) else None
    return latest, run_id if isinstance(run_id, str) else None, text


def read_latest(store: Store, nightly: NightlyConfig) -> dict | None:
    """This prefix's pointer, or None when there is none or it names no night of this prefix (a LATEST written
    by another prefix when all prefixes shared it): such a pointer is ignored, with a warning. A prefix without
    a pointer of its own yet takes the shared LATEST when that names one of its nights (it wrote it, before
    each prefix had its own), so that its first night after the change still has the late check."""
    key = latest_key(nightly)
    if not store.exists(key):
        if key == "LATEST" or not store.exists("LATEST"):
            return None
        latest, run_id, _ = _pointer(store, "LATEST")
        return latest if run_id is not None and date_of(nightly, run_id) is not None else None
    latest, run_id, text = _pointer(store, key)
    if run_id is None or date_of(nightly, run_id) is None:
        logger.warning(
            "ignoring %s: it names %r, not a night of nightly.run_prefix=%r (another prefix's LATEST from "
            "before each prefix had its own?); no newest complete night is known for the late check, and "
            "this night rewrites it when it completes",
            store.describe(key),
            run_id if run_id is not None else text[:200],
            nightly.run_prefix,
        )
        return None
    return latest


def lock_key(nightly: NightlyConfig) -> str:
    return f"_locks/{nightly.run_prefix}.lock"


def apply_retention(
    store: Store, nightly: NightlyConfig, today: dt.date, latest_run: str | None, *, dry_run: bool = False
) -> list[str]:
    """Deletes complete nights older than retention_days (never `latest_run`, this prefix's pointer's night,
    never an incomplete run); with `dry_run`, only names them."""
    if nightly.retention_days is None:
        return []
    cutoff = today - dt.timedelta(days=nightly.retention_days)
    runs = {key.split("/", 1)[0] for key in store.list(f"{nightly.run_prefix}-") if "/" in key}
    removed = []
    for run_id in sorted(runs):
        date = date_of(nightly, run_id)
        if date is None or date >= cutoff or run_id == latest_run:
            continue
        if not store.exists(f"{run_id}/_SUCCESS"):
            logger.info("retention: keeping %s (incomplete)", run_id)
            continue
        removed.append(run_id)
        if dry_run:
            logger.info("retention: would remove %s (older than %d days)", run_id, nightly.retention_days)
            continue
        # The run's markers go last: a retention cut short (an outage, a pod at its deadline) leaves a night
        # that still reads as complete, which the next retention removes; _SUCCESS gone first left a half
        # deleted night that read as incomplete, kept for ever.
        keys = store.list(f"{run_id}/")
        last = [f"{run_id}/{name}" for name in (RUN_FILE, SUCCESS)]
        store.delete([k for k in keys if k not in last])
        store.delete_prefix(f"{run_id}/")  # the markers, last; on a local output the emptied folders too
        count = len(keys)
        logger.info(
            "retention: removed %s (%d objects, older than %d days)", run_id, count, nightly.retention_days
        )
    return removed


# The night this process runs, once its date is known: what a Ctrl-C or SIGTERM tells the user to rerun.
_running: list[dt.date] = []


def resume_note() -> str:
    """After Ctrl-C or SIGTERM: how to resume the night. The same command without nightly.date runs the night
    of the date it is started on: past midnight (in nightly.timezone) that is the next night, and this one
    would stay incomplete."""
    if not _running:
        return RESUME_NOTE
    night = _running[-1].isoformat()
    return (
        f"every committed shard is kept; rerun with nightly.date={night} to resume this night (without it, "
        "a rerun after midnight runs the next night)"
    )


def run_nightly(job: JobConfig, nightly: NightlyConfig, resolved_yaml: str | None = None) -> int:
    from pipeline.runner.job import run

    try:
        validate_nightly(nightly)
        date = scheduled_date(nightly)
        today = scheduled_date(dataclasses.replace(nightly, date=None))
        if date > today + dt.timedelta(days=1):  # a day's leeway for clocks and zones; a typo is far off
            raise ConfigError(
                f"nightly.date={nightly.date!r} is after tomorrow (today is {today.isoformat()} in {nightly.timezone}): "
                "a night runs on or after its date. Run as given, it would become "
                f"{latest_key(nightly)} (every real night after it refused as late) and its retention would "
                "delete the nights before it"
            )
        if job.run.id is not None:
            raise ConfigError(
                f"run.id={job.run.id!r} must not be set for nightly runs: it derives from the date"
            )
        store = open_store(job.output.uri, endpoint_url=job.output.endpoint_url, region=job.output.region)
        latest = read_latest(store, nightly)
    except (ConfigError, StoreError) as e:
        logger.error("%s", e)
        return 2
    except Exception:  # noqa: BLE001 - anything else before the night starts is still "could not start"
        logger.exception("could not start the nightly run (exit code 2): unexpected error")
        return 2
    run_id = run_id_for(nightly, date)
    _running.append(date)
    latest_date = date_of(nightly, latest["run_id"]) if latest else None
    if _late(nightly, run_id, date, latest):
        return REFUSED
    if (
        job.run.dry_run
    ):  # no lock, no pointer, nothing deleted: the night's plan and what retention would remove
        job.run.id = run_id
        logger.info("nightly %s (scheduled date %s, %s)", run_id, date.isoformat(), nightly.timezone)
        with contextlib.suppress(StoreError):
            holder = read_holder(store, lock_key(nightly))
            if holder:
                logger.warning(
                    "%s names run %s on host %s, pid %s: while it runs, a real night is refused (exit code 3)",
                    store.describe(lock_key(nightly)),
                    holder.get("run_id", "?"),
                    holder.get("host", "?"),
                    holder.get("pid", "?"),
                )
        code = run(job, resolved_yaml=resolved_yaml)
        if code == 0:  # the pointer names this night once it completes, unless it is a backfill
            newest = run_id if latest_date is None or date >= latest_date else latest["run_id"]
            apply_retention(store, nightly, date, newest, dry_run=True)
        return code
    lease = Lease(
        store,
        lock_key(nightly),
        secrets.token_hex(8),
        run_id,
        nightly.lock_stale_s,
        what="nightly runs",
        stale_hint="nightly.lock_stale_s",
        # A retried night (its pod or head node died) finds its own lock still fresh: wait for it to go stale.
        wait_same_run_s=nightly.lock_stale_s + 60.0,
    )
    try:
        lease.acquire()
    except Refused as e:
        logger.error("%s", e)
        return REFUSED
    except StoreError as e:
        logger.error("could not take the lock %s: %s", lease.store.describe(lease.key), e)
        return 2
    logger.info("nightly %s (scheduled date %s, %s)", run_id, date.isoformat(), nightly.timezone)
    try:
        # Read again under the lock: a newer night may have completed between the first read and the lock.
        try:
            latest = read_latest(store, nightly)
        except StoreError as e:
            logger.error("%s", e)
            return 2
        latest_date = date_of(nightly, latest["run_id"]) if latest else None
        if _late(nightly, run_id, date, latest):
            return REFUSED
        job.run.id = run_id
        code = run(job, resolved_yaml=resolved_yaml)
        if code != 0:
            return code
        try:
            held = lease.held()  # read now: the heartbeat sees a takeover only at its next beat
        except StoreError as e:
            logger.error(
                "%s: cannot read the nightly lock (%s); not moving %s", run_id, e, latest_key(nightly)
            )
            return 1
        if not held:  # another night took the lock over: the pointer and retention are its
            logger.error("%s: not moving %s nor applying retention", run_id, latest_key(nightly))
            return 1
        if latest_date is None or date >= latest_date:
            pointer = {
                "run_id": run_id,
                "uri": f"{store.uri.rstrip('/')}/{run_id}",
                "date": date.isoformat(),
                "updated_at": time.time(),
            }
            try:
                store.write_text(latest_key(nightly), json.dumps(pointer) + "\n")
            except StoreError as e:  # the night is complete: a retry of it finds it so and moves the pointer
                logger.error(
                    "%s is complete, but %s could not be moved to it (%s): rerun the same night (nightly.date=%s) "
                    "to move it; retention is not applied",
                    run_id,
                    latest_key(nightly),
                    e,
                    date.isoformat(),
                )
                return 1
            logger.info("%s -> %s", latest_key(nightly), run_id)
        try:
            newest = read_latest(store, nightly)
            apply_retention(store, nightly, date, newest["run_id"] if newest else None)
        except StoreError as e:  # the night is complete and published: the next night's retention retries
            logger.error("retention failed (the next night retries it; %s is complete): %s", run_id, e)
        return 0
    finally:
        with signals_deferred("releasing the night's lock"):
            lease.release()


def _late(nightly: NightlyConfig, run_id: str, date: dt.date, latest: dict | None) -> bool:
    """Whether the night `run_id` comes after a newer complete night (`latest`, the prefix's pointer) and may not
    run (unless nightly.allow_late): logs why."""
    latest_date = date_of(nightly, latest["run_id"]) if latest else None
    if latest_date is None or latest_date <= date or nightly.allow_late:
        return False
    logger.error(
        "refusing to run %s late: the newer night %s is already complete (%s). Set "
        "nightly.allow_late=true to backfill it anyway; %s will keep pointing at the newest night.",
        run_id,
        latest["run_id"],
        latest_key(nightly),
        latest_key(nightly),
    )
    return True
