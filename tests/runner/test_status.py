"""jobs/status.py: where a run stands, from its directory alone (local and S3), while it runs and after."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config.schema import ClusterConfig, DataConfig, JobConfig, OutputConfig, RunConfig
from pipeline.io.commit import RUN_FILE, RUN_LOCK, SUCCESS
from pipeline.io.lease import Lease, pid_namespace
from pipeline.io.store import open_store
from pipeline.runner.job import RUN_LOCK_STALE_S, prepare
from pipeline.runner.status import describe, list_runs, run_status

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "jobs" / "status.py")]


def _started_run(tmp_path: Path, uri: str, run_id: str, endpoint: str | None = None):
    """A run of 10 rows in shards of 3 (4 shards) opened as a job opens it, nothing committed yet."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}"}) + "\n" for i in range(10)))
    job = JobConfig(
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=uri, endpoint_url=endpoint),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(id=run_id, shard_size=3),
    )
    return prepare(job, resolved_yaml="run: {}\n")


def _commit(prep, *shards: int) -> None:
    """Commits shards as a worker does; shard 0 with 1 row out and 2 rejected, the others with 3 rows out."""
    for shard in shards:
        errors = [{"id": "x", "source_index": 0, "stage": "tokenize", "reason": "r", "raw": "{}"}] * 2
        prep.run_store.commit_shard(
            shard,
            pa.table({"id": ["a", "b", "c"][: 1 if shard == 0 else 3]}),
            errors if shard == 0 else [],
            compression="zstd",
            stats={"tokens": 10, "errors_by_stage": {"tokenize": 2} if shard == 0 else {}},
            worker="w0",
            attempt=1,
        )


def test_a_running_run_then_a_stopped_one_then_a_complete_one(tmp_path):
    out = tmp_path / "out"
    prep = _started_run(tmp_path, str(out), "r1")
    _commit(prep, 3)  # an earlier invocation's shard: not in this invocation's rate
    store = prep.run_store.store
    lease = Lease(store, RUN_LOCK, secrets.token_hex(8), "r1", RUN_LOCK_STALE_S)
    lease.acquire()
    try:
        assert run_status(store)["shards_per_hour"] is None, "no shard of this invocation yet: no rate"
        _commit(prep, 0, 1)
        status = run_status(store)
    finally:
        lease.release()
    assert status["state"] == "running" and status["lock"]["pid"] == os.getpid() and status["lock"]["live"]
    assert (status["shards_committed"], status["shards_total"]) == (3, 4)
    assert (status["rows_out"], status["rows_error"], status["rows_in"], status["tokens"]) == (7, 2, 10, 30)
    assert status["errors_by_stage"] == {"tokenize": 2}
    # two shards since the lock was taken; one left at that rate
    rate = status["shards_per_hour"]
    assert rate > 0 and status["eta_s"] == pytest.approx(3600 / rate, abs=0.1)
    lines = "\n".join(describe(status))
    assert "r1 at " in lines and "running, 3/4 shards committed (75.0%)" in lines and "ETA 0:00:" in lines
    assert "rows: 7 out, 2 rejected, of 10 input rows; 30 tokens" in lines and "tokenize: 2" in lines
    assert "(live)" in lines

    # the lock of a process of this host that has died: stopped, not running
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    payload = {
        "token": "t",
        "run_id": "r1",
        "host": os.uname().nodename,
        "pid_namespace": pid_namespace(),
        "pid": int(dead.stdout),
        "heartbeat_at": 0,
    }
    store.write_text(RUN_LOCK, json.dumps(payload))
    status = run_status(store)
    assert status["state"] == "stopped" and "eta_s" not in status and not status["lock"]["live"]
    assert "stale: silent too long, or its process is gone" in "\n".join(describe(status))

    store.delete([RUN_LOCK])
    (out / "r1" / SUCCESS).write_text("")
    assert run_status(store)["state"] == "complete"


def test_the_cli_lists_the_runs_of_an_output_location_and_a_broken_one_hides_no_other(tmp_path):
    out = tmp_path / "out"
    _commit(_started_run(tmp_path, str(out), "r1"), 0)
    _commit(_started_run(tmp_path, str(out), "r2"), 0, 1, 2, 3)
    _started_run(tmp_path, str(out), "r3")
    (out / "r3" / RUN_FILE).write_text("{truncated")
    (out / "notes").mkdir()  # not a run
    assert list_runs(open_store(str(out))) == ["r1", "r2", "r3"]
    listed = subprocess.run([*CLI, str(out), "--json"], capture_output=True, text=True, check=True)
    by_id = {s["run_id"]: s for s in json.loads(listed.stdout)}
    assert {k: (s["state"], s.get("shards_committed")) for k, s in by_id.items()} == {
        "r1": ("stopped", 1),
        "r2": ("stopped", 4),  # every shard committed, but not finalized (_SUCCESS): a rerun finalizes it
        "r3": ("unreadable", None),
    }
    assert "_run.json is not readable" in by_id["r3"]["error"]
    one = subprocess.run([*CLI, str(out / "r1"), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(one.stdout)["run_id"] == "r1", "a run: one object; an output location: a list"


@pytest.mark.parametrize(
    "uri, endpoint, message",
    [
        ("{tmp}/out/notes", None, "no _run.json there, nor in a folder directly below it"),
        ("s3://", None, "uri='s3://' needs a bucket"),
        ("S3://bucket/x", None, "looks like a 'S3' URI"),
        (
            "s3://bucket/x",
            "127.0.0.1:8333",
            "--endpoint-url='127.0.0.1:8333' must be an http:// or https:// URL",
        ),
        ("s3://bucket/x", "http://admin:hunter2@127.0.0.1:1", "--endpoint-url holds credentials"),
    ],
)
def test_the_cli_refuses_what_it_cannot_read_with_exit_2_and_no_traceback(tmp_path, uri, endpoint, message):
    (tmp_path / "out" / "notes").mkdir(parents=True)
    args = [uri.format(tmp=tmp_path), *(["--endpoint-url", endpoint] if endpoint else [])]
    shown = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert shown.returncode == 2 and message in shown.stderr and "Traceback" not in shown.stderr
    assert "hunter2" not in shown.stderr + shown.stdout


@pytest.mark.s3
def test_the_status_of_a_run_on_s3(tmp_path, s3_bucket):
    uri = f"{s3_bucket.uri}/synthetic"
    _commit(_started_run(tmp_path, uri, "r1", endpoint=s3_bucket.endpoint), 0, 1)
    cli = [*CLI, uri, "--endpoint-url", s3_bucket.endpoint]
    shown = subprocess.run(cli, capture_output=True, text=True, check=True, env=os.environ)
    assert f"run r1 at {uri}/r1: stopped, 2/4 shards committed (50.0%)" in shown.stdout
    assert "rerun the same command to resume it" in shown.stdout
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in shown.stdout


def test_a_marker_deleted_between_the_listing_and_its_read_is_skipped(tmp_path):
    """A run being replaced (run.overwrite) or a night retired by retention while its markers are read."""
    prep = _started_run(tmp_path, str(tmp_path / "out"), "r1")
    _commit(prep, 0, 1)
    store = prep.run_store.store
    before = store.list("_commits/")
    store.delete(before[:1])
    listing = store.list
    store.list = lambda prefix="": before if prefix == "_commits/" else listing(prefix)  # the earlier listing
    assert set(prep.run_store.committed()) == {1}


@pytest.mark.ray
def test_a_complete_run_is_reported_from_its_stats_without_reading_its_markers(tmp_path, ray_local):
    """The status of an output location read every marker of every run, complete ones too: 31 s for 11,000
    markers on S3. A complete run's stats.json has its totals, written from every marker when it completed."""
    from pipeline.runner.job import run
    from tests.runner.test_job import make_job, write_prompts

    assert run(make_job(tmp_path, write_prompts(tmp_path / "p.jsonl", 14), run__shard_size=4)) == 0
    run_dir = tmp_path / "out" / "test-run"
    store = open_store(str(run_dir))
    from_markers = run_status(store)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert from_markers["state"] == "complete" and from_markers["shards_committed"] == 4
    assert (from_markers["rows_out"], from_markers["tokens"]) == (14, stats["tokens_generated"])
    assert from_markers["last_commit_at"] == stats["last_commit_at"]
    markers = {p.name: p.read_bytes() for p in (run_dir / "_commits").iterdir()}
    for name in markers:  # unreadable markers: only stats.json can give the totals now
        (run_dir / "_commits" / name).write_text("{")
    assert run_status(store) == from_markers
    del stats["last_commit_at"]  # a run completed before stats.json recorded it: its markers are read
    (run_dir / "stats.json").write_text(json.dumps(stats))
    assert run_status(store)["shards_committed"] == 0
    for name, payload in markers.items():
        (run_dir / "_commits" / name).write_bytes(payload)
    assert run_status(store) == from_markers


def test_the_rate_counts_this_invocations_shards_up_to_its_last_heartbeat(tmp_path):
    """shards/hour: the shards committed since the lock holder took the run (not an earlier invocation's), over
    the time from then to its last heartbeat (a stalled run's rate falls); ETA: the shards left at that rate.
    A running run is not told to rerun; a complete run whose lock is still held (a rerun finding it complete)
    is complete."""
    prep = _started_run(tmp_path, str(tmp_path / "out"), "r1")
    _commit(prep, 3)  # an earlier invocation's
    _commit(prep, 0, 1)
    at = {s: c.committed_at for s, c in prep.run_store.committed().items()}
    store = prep.run_store.store
    holder = {"token": "t", "run_id": "r1", "host": "another-host", "pid": 1}  # live: a fresh heartbeat
    store.write_text(RUN_LOCK, json.dumps({**holder, "acquired_at": at[0], "heartbeat_at": at[0] + 3600}))
    status = run_status(store)
    assert status["state"] == "running" and status["last_commit_at"] == at[1]
    assert (status["shards_per_hour"], status["eta_s"]) == (2.0, 1800.0)
    lines = "\n".join(describe(status))
    assert "rate: 2.0 shards/hour since this invocation took the run, ETA 0:30:00" in lines
    assert "not running" not in lines
    (tmp_path / "out" / "r1" / SUCCESS).write_text("")
    assert run_status(store)["state"] == "complete"


@pytest.mark.parametrize(
    "uri", ["s3://AKIAFAKE:CANARYsecret@bucket/runs", "s3://bucket/runs?X-Amz-Security-Token=CANARYsecret"]
)
def test_a_location_holding_credentials_is_refused_without_echoing_them(uri):
    """The refusal was printed as "no status for s3://AKIAFAKE:CANARYsecret@bucket/runs: uri holds credentials"."""
    shown = subprocess.run([*CLI, uri, "--json"], capture_output=True, text=True)
    assert shown.returncode == 2 and "uri holds " in shown.stderr
    assert "CANARY" not in shown.stderr + shown.stdout and "AKIAFAKE" not in shown.stderr + shown.stdout
