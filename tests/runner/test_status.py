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
from pipeline.io.commit import RUN_LOCK, SUCCESS
from pipeline.io.lease import Lease
from pipeline.io.store import open_store
from pipeline.runner.job import RUN_LOCK_STALE_S, prepare
from pipeline.runner.status import describe, list_runs, run_status

ROOT = Path(__file__).resolve().parents[2]


def _started_run(tmp_path: Path, uri: str, run_id: str, endpoint: str | None = None, committed: int = 2):
    """A run of 10 rows in shards of 3 (4 shards) opened as a job opens it, with `committed` shards committed
    (one of them with 2 rejected rows)."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}"}) + "\n" for i in range(10)))
    job = JobConfig(
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=uri, endpoint_url=endpoint),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(id=run_id, shard_size=3),
    )
    prep = prepare(job, resolved_yaml="run: {}\n")
    table = pa.table({"id": ["a", "b", "c"]})
    for shard in range(committed):
        errors = [{"id": "x", "source_index": 0, "stage": "tokenize", "reason": "r", "raw": "{}"}] * 2
        prep.run_store.commit_shard(
            shard,
            table.slice(0, 1 if shard == 0 else 3),
            errors if shard == 0 else [],
            compression="zstd",
            stats={"tokens": 10, "errors_by_stage": {"tokenize": 2} if shard == 0 else {}},
            worker="w0",
            attempt=1,
        )
    return prep


def test_a_running_run_then_a_stopped_one_then_a_complete_one(tmp_path):
    out = tmp_path / "out"
    prep = _started_run(tmp_path, str(out), "r1")
    store = prep.run_store.store
    lease = Lease(store, RUN_LOCK, secrets.token_hex(8), "r1", RUN_LOCK_STALE_S)
    lease.acquire()
    try:
        status = run_status(store)
    finally:
        lease.release()
    assert status["state"] == "running" and status["lock"]["pid"] == os.getpid()
    assert (status["shards_committed"], status["shards_total"]) == (2, 4)
    assert (status["rows_out"], status["rows_error"], status["rows_in"], status["tokens"]) == (4, 2, 10, 20)
    assert status["errors_by_stage"] == {"tokenize": 2}
    # two shards since _config.yaml was written (this invocation opened the run): 2 more at that rate
    rate = status["shards_per_hour"]
    assert rate > 0 and status["eta_s"] == pytest.approx(3600 * 2 / rate, abs=0.1)
    lines = "\n".join(describe(status))
    assert "r1 at " in lines and "running, 2/4 shards committed (50.0%)" in lines and "ETA 0:00:" in lines
    assert "rows: 4 out, 2 rejected, of 10 input rows; 20 tokens" in lines and "tokenize: 2" in lines

    # the lock of a process of this host that has died: stopped, not running
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    payload = {
        "token": "t",
        "run_id": "r1",
        "host": os.uname().nodename,
        "pid": int(dead.stdout),
        "heartbeat_at": 0,
    }
    store.write_text(RUN_LOCK, json.dumps(payload))
    status = run_status(store)
    assert status["state"] == "stopped" and "eta_s" not in status
    assert "stale: its process is gone" in "\n".join(describe(status))

    store.delete([RUN_LOCK])
    (out / "r1" / SUCCESS).write_text("")
    assert run_status(store)["state"] == "complete"


def test_the_cli_lists_the_runs_of_an_output_location_and_refuses_a_location_without_one(tmp_path):
    out = tmp_path / "out"
    _started_run(tmp_path, str(out), "r1", committed=1)
    _started_run(tmp_path, str(out), "r2", committed=4)
    (out / "notes").mkdir()  # not a run
    assert list_runs(open_store(str(out))) == ["r1", "r2"]
    cli = [sys.executable, str(ROOT / "jobs" / "status.py")]
    listed = subprocess.run([*cli, str(out), "--json"], capture_output=True, text=True, check=True)
    by_id = {s["run_id"]: s for s in json.loads(listed.stdout)}
    assert {k: (s["state"], s["shards_committed"]) for k, s in by_id.items()} == {
        "r1": ("stopped", 1),
        "r2": ("stopped", 4),  # every shard committed, but not finalized (_SUCCESS): a rerun finalizes it
    }
    missing = subprocess.run([*cli, str(out / "notes")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no canvasflow run at" in missing.stdout


@pytest.mark.s3
def test_the_status_of_a_run_on_s3(tmp_path, s3_bucket):
    uri = f"{s3_bucket.uri}/synthetic"
    _started_run(tmp_path, uri, "r1", endpoint=s3_bucket.endpoint)
    cli = [sys.executable, str(ROOT / "jobs" / "status.py"), uri, "--endpoint-url", s3_bucket.endpoint]
    shown = subprocess.run(cli, capture_output=True, text=True, check=True, env=os.environ)
    assert f"run r1 at {uri}/r1: stopped, 2/4 shards committed (50.0%)" in shown.stdout
    assert "rerun the same command to resume it" in shown.stdout
    assert (
        "AWS_SECRET_ACCESS_KEY" not in shown.stdout
        and os.environ["AWS_SECRET_ACCESS_KEY"] not in shown.stdout
    )
