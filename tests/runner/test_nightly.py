"""Nightly runs: one complete run per date, retries resume, LATEST only after _SUCCESS, locks and retention."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config.schema import NightlyConfig
from pipeline.io.lease import pid_namespace, process_start
from pipeline.io.store import LocalStore, StoreError
from pipeline.runner.nightly import (
    Lease,
    Refused,
    apply_retention,
    latest_key,
    read_latest,
    run_id_for,
    scheduled_date,
)
from tests.runner.test_faults import kill_group, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_scheduled_date_follows_the_time_zone():
    late_evening_utc = dt.datetime(2026, 11, 27, 23, 30, tzinfo=dt.timezone.utc)
    assert scheduled_date(NightlyConfig(timezone="UTC"), late_evening_utc) == dt.date(2026, 11, 27)
    assert scheduled_date(NightlyConfig(timezone="Europe/Paris"), late_evening_utc) == dt.date(2026, 11, 28)
    assert scheduled_date(NightlyConfig(date="2026-01-02")) == dt.date(2026, 1, 2)
    assert run_id_for(NightlyConfig(), dt.date(2026, 1, 2)) == "nightly-2026-01-02"


def _lock(store, key="_locks/n.lock", stale_s=30.0) -> Lease:
    return Lease(store, key, os.urandom(4).hex(), "nightly-x", stale_s, what="nightly runs")


def test_a_live_lock_refuses_an_overlapping_run_and_a_stale_one_is_taken_over(tmp_path):
    store = LocalStore(tmp_path)
    first = _lock(store)
    first.acquire()
    with pytest.raises(
        Refused, match="another run holds .* Overlapping nightly runs are refused: wait for it to end"
    ):
        _lock(store).acquire()
    first.release()
    assert not store.exists("_locks/n.lock")
    # A crashed holder on this host (dead pid) is stale at once; a silent remote one once its heartbeat is old.
    store.write_text(
        "_locks/n.lock",
        json.dumps(
            {
                "token": "t",
                "run_id": "old",
                "host": socket.gethostname(),
                "pid_namespace": pid_namespace(),
                "pid": 2**22 + 17,
                "heartbeat_at": time.time(),
            }
        ),
    )
    taker = _lock(store)
    taker.acquire()
    taker.release()
    store.write_text(
        "_locks/n.lock",
        json.dumps(
            {"token": "t", "run_id": "old", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 100}
        ),
    )
    # Its last heartbeat reached the store 100 s ago (the lock's age is the store's, not the holder's clock).
    lock_file = tmp_path / "_locks" / "n.lock"
    os.utime(lock_file, (time.time() - 100, time.time() - 100))
    with pytest.raises(Refused):
        _lock(store, stale_s=1000).acquire()
    taker = _lock(store, stale_s=30)
    taker.acquire()
    taker.release()


@pytest.mark.skipif(pid_namespace() is None, reason="needs /proc (Linux)")
@pytest.mark.parametrize(
    ("namespace", "start", "taken", "why"),
    [
        ("ours", "another-boot/123", True, "its pid names a process started since: the holder died"),
        ("ours", "ours", False, "the holder itself, alive"),
        ("ours", None, False, "a lock written before the start was recorded: its live pid, as before"),
        ("pid:[1]", None, False, "another container sharing the hostname: the pid means nothing here"),
        ("pid:[1]", "another-boot/123", False, "the same, whatever its start"),
        (None, "another-boot/123", False, "a lock written before the namespace was recorded: the heartbeat"),
    ],
    ids=["pid-reused", "alive", "no-start", "other-namespace", "other-namespace-start", "no-namespace"],
)
def test_the_pid_of_a_same_host_holder_is_judged_only_in_its_own_pid_namespace(
    tmp_path, namespace, start, taken, why
):
    """A lock names its holder's pid, pid namespace and process start. A driver of a container that shares the
    hostname (host networking) sees other processes under those pids: it took over a live lock whose pid was
    not alive in its namespace, or kept out a rerun that found its own pid in a dead holder's lock. Only in
    the holder's namespace is the pid looked up (this process's pid plays the holder's; the heartbeat is
    fresh, so every other case is the heartbeat's to decide: alive)."""
    store = LocalStore(tmp_path)
    lock = {"token": "t", "run_id": "old", "host": socket.gethostname(), "pid": os.getpid()}
    lock["heartbeat_at"] = time.time()
    if namespace is not None:
        lock["pid_namespace"] = pid_namespace() if namespace == "ours" else namespace
    if start is not None:
        lock["process_start"] = process_start(os.getpid()) if start == "ours" else start
    store.write_text("_locks/n.lock", json.dumps(lock))
    taker = _lock(store)
    if taken:
        taker.acquire()
        mine = json.loads(store.read_text("_locks/n.lock"))
        assert (mine["pid_namespace"], mine["process_start"]) == (pid_namespace(), process_start(os.getpid()))
        taker.release()
    else:
        with pytest.raises(Refused, match="another run holds"):
            taker.acquire()


def test_a_holder_whose_lock_was_taken_over_stops_and_never_writes_it_back(tmp_path, caplog):
    """A holder cut off from the store past stale_s is taken over; when it got through again, its heartbeat
    wrote its own lock back over the new holder's: two holders (the new one's commits then fenced, its
    cleanup deleting the old one's parts; on the nightly lock two nights moving LATEST and deleting)."""
    store = LocalStore(tmp_path)
    first = _lock(store, stale_s=4.0)  # a heartbeat a second
    first.acquire()
    assert not first.lost
    taker = _lock(store)
    store.write_text("_locks/n.lock", taker._payload())  # the takeover, while the first one was silent
    with caplog.at_level(logging.ERROR, logger="canvasflow"):
        deadline = time.monotonic() + 10
        while not first.lost and time.monotonic() < deadline:
            time.sleep(0.1)
    assert first.lost and "lost " in caplog.text and "it stops writing what the lock guards" in caplog.text
    time.sleep(1.5)  # beats it would have sent
    assert json.loads(store.read_text("_locks/n.lock"))["token"] == taker.token
    first.release()  # not its lock any more: left alone
    assert json.loads(store.read_text("_locks/n.lock"))["token"] == taker.token


def test_a_live_holder_whose_clock_runs_behind_is_not_taken_over(tmp_path):
    """A remote holder 10 minutes behind writes heartbeat_at values that look 600 s old; its lock was written
    a moment ago by the store's clock, so it is alive. (Judged by heartbeat_at it was taken over: two runs.)"""
    store = LocalStore(tmp_path)
    behind = {
        "token": "t",
        "run_id": "live",
        "host": "elsewhere",
        "pid": 1,
        "heartbeat_at": time.time() - 600,
    }
    store.write_text("_locks/n.lock", json.dumps(behind))
    with pytest.raises(Refused, match=r"heartbeat \d+s ago"):
        _lock(store, stale_s=120).acquire()
    assert json.loads(store.read_text("_locks/n.lock"))["token"] == "t"


def test_retention_removes_only_old_complete_runs(tmp_path):
    store = LocalStore(tmp_path)
    for day, complete in [(1, True), (2, False), (3, True), (9, True), (10, True)]:
        run = f"nightly-2026-11-{day:02d}"
        store.write_text(f"{run}/data/part-00000.parquet", "x")
        if complete:
            store.write_text(f"{run}/_SUCCESS", "{}")
    removed = apply_retention(
        store, NightlyConfig(retention_days=5), dt.date(2026, 11, 10), "nightly-2026-11-03"
    )
    assert removed == ["nightly-2026-11-01"]
    kept = {k.split("/")[0] for k in store.list("")}
    assert kept == {"nightly-2026-11-02", "nightly-2026-11-03", "nightly-2026-11-09", "nightly-2026-11-10"}


@pytest.mark.s3
def test_a_retention_cut_short_leaves_a_complete_night_that_the_next_one_removes(s3_bucket, s3_fault_proxy):
    """Keys were deleted in sorted order, 1,000 at a time: _SUCCESS, _run.json and _commits/ went with the first
    batch, so a retention that failed on a later batch (an outage, a pod at its deadline) left a night that read
    as incomplete, kept for ever ("retention: keeping ... (incomplete)"), unreadable to status and dry runs."""
    night = "nightly-2026-11-01"
    keys = [f"{night}/{name}" for name in ("_SUCCESS", "_run.json", "_commits/shard-00000.json")]
    keys += [f"{night}/data/part-{i:05d}.parquet" for i in range(1001)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_bucket.put(key, b"x"), keys))
    store = s3_bucket.store(endpoint_url=s3_fault_proxy.endpoint)
    config = NightlyConfig(retention_days=5)
    # the first DeleteObjects goes through, every later one fails (each of its attempts)
    s3_fault_proxy.fail_next(100, 503, "ServiceUnavailable", method="POST", skip=1)
    with pytest.raises(StoreError):
        apply_retention(store, config, dt.date(2026, 11, 10), None)
    left = s3_bucket.keys()
    assert 0 < len(left) < len(keys) and f"{night}/_SUCCESS" in left, "cut short, still complete"
    s3_fault_proxy.clear_faults()  # the outage is over
    assert apply_retention(store, config, dt.date(2026, 11, 11), None) == [night]
    assert s3_bucket.keys() == []


def test_retention_on_a_local_output_removes_the_night_s_directory_too(tmp_path):
    store = LocalStore(tmp_path)
    for day in (1, 10):
        run = f"nightly-2026-11-{day:02d}"
        for key in ("data/part-00000.parquet", "_commits/shard-00000.json", "_SUCCESS"):
            store.write_text(f"{run}/{key}", "x")
    removed = apply_retention(
        store, NightlyConfig(retention_days=5), dt.date(2026, 11, 10), "nightly-2026-11-10"
    )
    assert removed == ["nightly-2026-11-01"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly-2026-11-10"]  # no empty tree left behind


def test_a_night_dated_after_tomorrow_is_refused_before_it_moves_latest_or_applies_retention(tmp_path):
    # A mistyped date (2062 for 2026) would move LATEST to it, so that every real night after it is refused as
    # late, and its retention would delete every complete night up to 30 days before 2062.
    out = tmp_path / "out"
    for night in ("nightly-2026-11-25", "nightly-2026-11-26"):
        (out / night).mkdir(parents=True)
        (out / night / "_SUCCESS").write_text("{}")
    (out / "LATEST").write_text(json.dumps({"run_id": "nightly-2026-11-26"}))
    future = (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=2)).isoformat()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "nightly.py"), f"output.uri={out}", f"nightly.date={future}"]
        + ["nightly.retention_days=30"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()  # nightly.timezone's default is UTC
    assert f"nightly.date='{future}' is after tomorrow (today is {today} in UTC)" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["LATEST", "nightly-2026-11-25", "nightly-2026-11-26"]
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-11-26"


def _nightly(out: Path, data: Path, date: str, cwd: Path, *extra: str) -> subprocess.Popen:
    args = [
        f"output.uri={out}",
        f"data.path={data}",
        f"nightly.date={date}",
        "run.shard_size=2",
        "model.path=builtin:tiny-diffusiongemma-random",
        "sampler.max_denoising_steps=4",
        "sampler.max_new_tokens=32",
        "cluster.num_workers=1",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "nightly.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.ray
def test_nightly_retry_resumes_the_same_night_and_latest_moves_only_forward(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse: word{i}"}) + "\n" for i in range(16)))
    out = tmp_path / "nightly"
    commits = out / "nightly-2026-11-26" / "_commits"

    first = _nightly(out, data, "2026-11-26", tmp_path)
    wait_for(
        lambda: commits.exists() and len(list(commits.iterdir())) >= 2,
        300,
        "two commits of the first try",
        first,
    )
    first.send_signal(signal.SIGKILL)
    kill_group(first)
    assert not (out / "LATEST").exists(), "LATEST moves only after _SUCCESS"
    assert (out / "_locks" / "nightly.lock").exists(), "the killed run left its lock behind"
    done_before = len(list(commits.iterdir()))

    retry = _nightly(out, data, "2026-11-26", tmp_path)
    log, _ = retry.communicate(timeout=600)
    assert retry.returncode == 0, log[-3000:]
    assert "taking over the stale lock" in log
    stats = json.loads((out / "nightly-2026-11-26" / "stats.json").read_text())
    assert stats["shards"]["skipped_already_committed"] == done_before
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-11-26"

    following = _nightly(out, data, "2026-11-27", tmp_path)
    log, _ = following.communicate(timeout=600)
    assert following.returncode == 0, log[-3000:]
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-11-27"

    late = _nightly(out, data, "2026-11-25", tmp_path)
    log, _ = late.communicate(timeout=300)
    assert late.returncode == 3 and "refusing to run nightly-2026-11-25 late" in log

    runs = sorted(p.name for p in out.iterdir() if p.name.startswith("nightly-"))
    assert runs == ["nightly-2026-11-26", "nightly-2026-11-27"], "one run per date, no second run for a retry"
    for run in runs:
        assert (out / run / "_SUCCESS").exists()
        manifest = json.loads((out / run / "_manifest.json").read_text())
        assert manifest["rows_out"] + manifest["rows_error"] == 16
    assert not (out / "_locks" / "nightly.lock").exists()


def test_each_run_prefix_reads_only_its_own_pointer(tmp_path, caplog):
    """LATEST stays the default prefix's pointer (documented and deployed); another prefix has
    LATEST-<prefix>. A LATEST naming another prefix's night (all prefixes shared it before) is ignored, with a
    warning; a prefix without a pointer of its own yet takes a shared LATEST naming one of its own nights."""
    code, math = NightlyConfig(run_prefix="code"), NightlyConfig(run_prefix="math")
    assert latest_key(NightlyConfig()) == "LATEST" and latest_key(code) == "LATEST-code"
    store = LocalStore(tmp_path)
    store.write_text("LATEST", json.dumps({"run_id": "code-2026-11-27"}))
    assert read_latest(store, math) is None, "the shared LATEST names no night of math's"
    assert read_latest(store, code) == {"run_id": "code-2026-11-27"}, "code wrote it: its late check holds"
    with caplog.at_level("WARNING", logger="canvasflow"):
        assert read_latest(store, NightlyConfig()) is None
    assert "LATEST" in caplog.text and "code-2026-11-27" in caplog.text
    store.write_text("LATEST-code", "code-2026-11-26\n")  # a pointer written by hand: the bare run id
    assert read_latest(store, code) == {"run_id": "code-2026-11-26"}, "its own pointer comes first"


@pytest.mark.ray
def test_two_run_prefixes_in_one_output_keep_their_own_latest_late_check_and_retention(tmp_path):
    """Two nightly datasets in one output.uri: `code` and the default prefix (`nightly`). LATEST was shared by
    every prefix: the one that completed last owned it, which disabled the other's late check and fed the
    other's run id to its retention."""
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Reverse: word"}) + "\n")
    out = tmp_path / "nightly"
    for night in ("code-2026-11-01", "code-2026-11-20", "nightly-2026-11-01"):  # old complete nights
        (out / night).mkdir(parents=True)
        (out / night / "_SUCCESS").write_text("{}")
    # The shared LATEST as code's last night left it before each prefix had its own pointer.
    (out / "LATEST").write_text(json.dumps({"run_id": "code-2026-11-20"}))

    def night(date: str, prefix: str, timeout: float) -> tuple[int, str]:
        proc = _nightly(out, data, date, tmp_path, f"nightly.run_prefix={prefix}", "nightly.retention_days=5")
        log, _ = proc.communicate(timeout=timeout)
        return proc.returncode, log

    def pointer(name: str) -> str:
        return json.loads((out / name).read_text())["run_id"]

    code, log = night("2026-11-27", "code", 600)  # code's newest night
    assert code == 0, log[-3000:]
    code, log = night("2026-11-26", "nightly", 600)  # the default prefix completes last, a day earlier
    assert code == 0, log[-3000:]
    assert "ignoring" in log and "code-2026-11-20" in log, "the legacy LATEST named code's night: ignored"

    # (a) each prefix's pointer names its own newest night, whichever prefix completed last.
    assert pointer("LATEST") == "nightly-2026-11-26"
    assert pointer("LATEST-code") == "code-2026-11-27"

    # (b) a late night of code is refused: code's newer night is complete, though the other prefix completed
    # last.
    code, log = night("2026-11-25", "code", 300)
    assert code == 3 and "refusing to run code-2026-11-25 late" in log and "code-2026-11-27" in log, log[
        -3000:
    ]
    assert not (out / "code-2026-11-25").exists(), "nothing was generated"

    # (c) retention removed each prefix's old complete nights and neither prefix's newest one.
    runs = sorted(p.name for p in out.iterdir() if (p / "_SUCCESS").exists())
    assert runs == ["code-2026-11-27", "nightly-2026-11-26"]
    assert pointer("LATEST") in runs and pointer("LATEST-code") in runs


def test_overlapping_nightly_is_refused(tmp_path):
    out = tmp_path / "nightly"
    LocalStore(out).write_text(
        "_locks/nightly.lock",
        json.dumps(
            {
                "token": "live",
                "run_id": "nightly-2026-11-26",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat_at": time.time(),
            }
        ),
    )
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "x"}) + "\n")
    proc = _nightly(out, data, "2026-11-27", tmp_path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, log[-2000:]
    assert "another run holds" in log and "nightly-2026-11-26" in log
    assert not (out / "nightly-2026-11-27").exists(), "nothing was generated"


def test_an_attempt_of_the_same_night_is_waited_for_until_stale_and_another_night_is_refused_at_once(
    tmp_path,
):
    """A retried night whose previous attempt died on another host (its lock still fresh) takes the lock once
    it goes stale, instead of being refused (exit 3, which the CronJob does not retry: the night was lost)."""
    store = LocalStore(tmp_path)
    dead = {"token": "t", "run_id": "nightly-x", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time()}
    store.write_text("_locks/n.lock", json.dumps(dead))
    started = time.monotonic()
    retry = Lease(store, "_locks/n.lock", "retry", "nightly-x", 1.5, what="nightly runs", wait_same_run_s=30)
    retry.acquire()
    assert 1.5 <= time.monotonic() - started < 15
    assert json.loads(store.read_text("_locks/n.lock"))["token"] == "retry"
    retry.release()

    # Another night is refused at once, however long same-run holders are waited for.
    store.write_text("_locks/n.lock", json.dumps({**dead, "run_id": "nightly-y"}))
    started = time.monotonic()
    with pytest.raises(Refused, match="nightly-y"):
        Lease(store, "_locks/n.lock", "r", "nightly-x", 30, what="nightly runs", wait_same_run_s=60).acquire()
    assert time.monotonic() - started < 5


def test_a_live_attempt_of_the_same_night_is_refused_after_the_wait(tmp_path):
    store = LocalStore(tmp_path)
    live = Lease(store, "_locks/n.lock", "live", "nightly-x", 4.0, what="nightly runs")
    live.acquire()  # heartbeats every second: never 4 s old
    try:
        started = time.monotonic()
        with pytest.raises(Refused, match="another run holds"):
            Lease(store, "_locks/n.lock", "second", "nightly-x", 4.0, wait_same_run_s=3).acquire()
        assert 3 <= time.monotonic() - started < 15
    finally:
        live.release()
    # Released while a same-run attempt waits: it takes the lock at once.
    live = Lease(store, "_locks/n.lock", "live", "nightly-x", 60.0)
    live.acquire()
    waiter = Lease(store, "_locks/n.lock", "waiter", "nightly-x", 60.0, wait_same_run_s=30)
    timer = threading.Timer(1.0, live.release)
    timer.start()
    started = time.monotonic()
    waiter.acquire()
    assert (
        time.monotonic() - started < 10 and json.loads(store.read_text("_locks/n.lock"))["token"] == "waiter"
    )
    waiter.release()
    timer.join()


def test_a_lock_whose_write_landed_though_its_answer_was_lost_is_ours(tmp_path):
    """A PUT that succeeded but whose answer was lost is retried and refused (412): the lock then holds our
    own token, and our own live pid on this host. It was refused as another run's."""
    store = LocalStore(tmp_path)
    ours = {"token": "me", "run_id": "r", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat_at": 0}
    store.write_text("_lock", json.dumps(ours))
    lease = Lease(store, "_lock", "me", "r", 120.0)
    lease.acquire()
    lease.release()
    assert not store.exists("_lock")


def test_an_interrupted_acquire_leaves_no_lock_of_its_own(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_text(
        "_lock", json.dumps({"token": "dead", "run_id": "r", "host": "x", "pid": 1, "heartbeat_at": 0})
    )
    os.utime(tmp_path / "_lock", (0, 0))  # stale: taken over
    lease = Lease(store, "_lock", "me", "r", 120.0)

    def interrupted(seconds):  # the signal lands in the takeover's re-check pause
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.io.lease.time.sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lease.acquire()
    assert not store.exists("_lock")


@pytest.mark.ray
def test_a_latest_pointer_that_cannot_be_written_exits_1_and_a_retry_of_the_night_moves_it(
    tmp_path, ray_local, caplog
):
    """A complete night whose LATEST could not be written (a full disk, a store that failed every retry) crashed
    the nightly job with a StoreError traceback. Now it exits 1 saying to rerun the night, which finds the night
    complete and moves LATEST."""
    from pipeline.runner.nightly import run_nightly
    from tests.runner.test_job import make_job, write_prompts

    job = make_job(tmp_path, write_prompts(tmp_path / "p.jsonl", 4), run__id=None)
    out = tmp_path / "out"
    (out / "LATEST").mkdir(parents=True)  # a write there fails, as on a full disk
    nightly = NightlyConfig(date="2026-11-26")
    with caplog.at_level("ERROR", logger="canvasflow"):
        assert run_nightly(job, nightly) == 1
    assert "nightly-2026-11-26 is complete, but LATEST could not be moved to it" in caplog.text
    assert (out / "nightly-2026-11-26" / "_SUCCESS").exists()
    assert not (out / "_locks" / "nightly.lock").exists(), "the nightly lock is released"
    (out / "LATEST").rmdir()
    job.run.id = None  # run_nightly set it to the night's
    assert run_nightly(job, nightly) == 0
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-11-26"
