"""One process at a time writes a run: while another live process holds the run's lock, a second run of the
same run id is refused at start-up (exit code 2) and touches nothing, also with run.overwrite=true; a lock left
by a dead process on this host is taken over at once. Holding the lock, a run removes the temporary files that
killed writes left behind."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pipeline.io.lease import Lease
from pipeline.io.store import LocalStore, _write_temp
from pipeline.runner.job import RUN_LOCK, STALE_TEMP_S, prepare, run
from tests.runner.test_job import ROOT, make_job, read_parts, write_prompts

pytestmark = pytest.mark.ray


def test_a_second_process_on_the_same_run_is_refused_and_a_dead_holder_taken_over(
    tmp_path, ray_local, caplog
):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    run_dir = tmp_path / "out" / "test-run"
    prepare(make_job(tmp_path, data))  # the other run started test-run (its _run.json) ...
    store = LocalStore(str(run_dir))
    holder = Lease(store, RUN_LOCK, "other-process", "test-run", 120.0)
    holder.acquire()  # ... and writes it: this test process plays that live run
    try:
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / "part-00000.parquet").write_bytes(b"being written by the other run")
        with caplog.at_level(logging.ERROR, logger="canvasflow"):
            assert run(make_job(tmp_path, data)) == 2
        assert (
            "another run holds" in caplog.text and "Overlapping runs of one run id are refused" in caplog.text
        )
        assert (run_dir / "data" / "part-00000.parquet").read_bytes() == b"being written by the other run"
        assert not (run_dir / "_SUCCESS").exists()
    finally:
        holder._stop.set()  # stop heartbeating without releasing: the lock stays, as a crash leaves it
    # the holder "crashes": its lock now names a process that has exited
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = json.loads((run_dir / RUN_LOCK).read_text())
    (run_dir / RUN_LOCK).write_text(json.dumps({**lock, "pid": int(dead.stdout)}))
    assert run(make_job(tmp_path, data)) == 0
    assert read_parts(run_dir).num_rows == 8 and (run_dir / "_SUCCESS").exists()
    assert not (run_dir / RUN_LOCK).exists(), "a finished run releases its lock"


HOLDER = """
import sys, time
from pipeline.io.lease import Lease
from pipeline.io.store import LocalStore
Lease(LocalStore(sys.argv[1]), "_lock", "other-process", "test-run", 120.0).acquire()
print("holding", flush=True)
time.sleep(600)
"""


def test_overwrite_is_refused_while_a_live_process_holds_the_run_and_replaces_it_once_that_process_died(
    tmp_path, ray_local, caplog
):
    """run.overwrite=true used to delete everything at the run id, the live holder's lock and parts included,
    and go on; it replaces only a run whose holder is gone (here a real process, then SIGKILLed)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    run_dir = tmp_path / "out" / "test-run"
    prepare(make_job(tmp_path, data))  # the other run started test-run with seed 0 ...
    run_file = (run_dir / "_run.json").read_text()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"  # ... and a live process of it holds the lock
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / "part-00000.parquet").write_bytes(b"being written by the other run")
        replace = make_job(tmp_path, data, sampler__seed=7, run__overwrite=True)
        with caplog.at_level(logging.ERROR, logger="canvasflow"):
            assert run(replace) == 2
        assert f"run test-run: another run holds {run_dir / RUN_LOCK}: test-run on " in caplog.text
        assert f"(pid {holder.pid}, heartbeat " in caplog.text
        assert (
            "or stop it; a holder that died is taken over once its heartbeat is older than 120s"
        ) in caplog.text  # the advice, once
        assert (
            "has died). run.overwrite=true replaces only a run that no live process writes. Then rerun (exit code 2: "
            "not started)."
        ) in caplog.text
        assert "wait for it to finish" not in caplog.text
        assert (run_dir / "data" / "part-00000.parquet").read_bytes() == b"being written by the other run"
        assert (run_dir / "_run.json").read_text() == run_file
        assert json.loads((run_dir / RUN_LOCK).read_text())["token"] == "other-process"
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, naming a dead process on this host
        holder.wait()
    assert json.loads((run_dir / RUN_LOCK).read_text())["pid"] == holder.pid
    assert run(replace) == 0
    assert read_parts(run_dir).column("seed").to_pylist() == [7] * 8
    assert json.loads((run_dir / "_run.json").read_text()) != json.loads(run_file)
    assert not (run_dir / RUN_LOCK).exists()


def test_a_run_removes_the_stale_temporary_files_that_killed_writes_left(tmp_path, ray_local, caplog):
    """A write SIGKILLed between write and rename leaves its `.tmp-*` file in the run directory, never listed
    and so never cleaned. A run holding the lock removes those untouched for STALE_TEMP_S before its workers
    start, and again before it finalizes (by then, one too young at the start may be old enough); never a
    younger one, which may be a write in flight, except under the shard folders of a complete run and those of
    the driver's own files (no such write may land any more)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    run_dir = tmp_path / "out" / "test-run"
    store = LocalStore(run_dir)

    def leftover(key: str, size: int, age_s: float):
        path = store._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path, b"x" * size)  # what write_bytes leaves when killed before its rename
        os.utime(tmp, (time.time() - age_s, time.time() - age_s))
        return tmp

    stale = [
        leftover("data/part-00000.parquet", 1000, 3600),
        leftover("errors/part-00001.parquet", 200, 3600),
        leftover("_commits/shard-00000.json", 30, 600),
        leftover("_run.json", 7, STALE_TEMP_S + 30),
    ]
    aged_during_run = leftover("data/part-00001.parquet", 500, 0)  # a quick retry: too young at the start
    young = leftover("_lock", 9, 0)  # e.g. a heartbeat's write in flight
    young_in_shards = leftover("errors/part-00003.parquet", 11, 0)  # e.g. a worker killed mid-write just now
    young_of_driver = leftover("_config.yaml", 13, 0)  # only the lock's holder writes it: a killed driver's
    job = make_job(tmp_path, data)
    job.postprocess = {"_target_": "tests.runner.postprocess_fns.age_file", "path": str(aged_during_run)}
    prepare(job)  # the killed run had started (its _run.json); its postprocess ages that file in the workers
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        assert run(job) == 0
    assert not any(path.exists() for path in stale) and not aged_during_run.exists()
    assert young.exists(), "a temporary file younger than STALE_TEMP_S may be a write in flight"
    assert not young_in_shards.exists(), "once every shard is committed, none under the shard folders lands"
    assert not young_of_driver.exists(), "nor one of the driver's own files"
    removed = [r.getMessage() for r in caplog.records if "stale temporary file" in r.getMessage()]
    assert removed == [
        f"removed 4 stale temporary file(s) (1237 bytes) of interrupted writes under {run_dir}",
        f"removed 3 stale temporary file(s) (524 bytes) of interrupted writes under {run_dir}",
    ]
    assert read_parts(run_dir).num_rows == 8 and (run_dir / "_SUCCESS").exists()


def test_a_driver_killed_while_it_finalized_leaves_no_temporary_file_once_the_run_is_complete(
    tmp_path, ray_local
):
    """A driver killed while writing _manifest.json, stats.json, README.md or _SUCCESS left its `.tmp-*` file at
    the top of the run for good: the rerun that finalized kept it (too young), and every later rerun found the
    run complete and returned before any cleanup. So did a start killed in the output location's write check
    (its probe, or the probe's temporary file, at the top of output.uri)."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    out = tmp_path / "out"
    run_dir = out / "test-run"
    assert run(make_job(tmp_path, data)) == 0
    store = LocalStore(run_dir)
    manifest = _write_temp(run_dir / "_manifest.json", b"{")  # killed in finalize: _SUCCESS not written yet
    (run_dir / "_SUCCESS").unlink()
    assert run(make_job(tmp_path, data)) == 0 and (run_dir / "_SUCCESS").exists()
    assert not manifest.exists()
    readme = _write_temp(run_dir / "README.md", b"#")  # a complete run's leftover, from any kill before
    heartbeat = _write_temp(run_dir / RUN_LOCK, b"{}")  # a heartbeat's write, maybe in flight: never touched
    old_probe, old_probe_temp = (
        out / ".canvasflow-probe-1-2",
        _write_temp(out / ".canvasflow-probe-3-4", b"ok"),
    )
    old_probe.write_text("ok")
    for path in (old_probe, old_probe_temp):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    new_probe = out / ".canvasflow-probe-5-6"  # another process's check, just now
    new_probe.write_text("ok")
    assert run(make_job(tmp_path, data)) == 0
    assert not readme.exists() and heartbeat.exists() and new_probe.exists()
    assert not old_probe.exists() and not old_probe_temp.exists()
    assert read_parts(run_dir).num_rows == 8 and store.exists("README.md")
