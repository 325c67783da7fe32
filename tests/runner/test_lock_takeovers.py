"""What a lock holder does when another process moved in between its checks: a night that finds a newer night
complete once it holds the nightly lock does not run; a night or a driver whose lock was taken over while it
ran (cut off from the store past the stale time) moves no pointer, deletes nothing and does not finalize."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config.schema import NightlyConfig
from pipeline.io.lease import Lease
from pipeline.runner import job as job_module
from pipeline.runner.nightly import REFUSED, run_nightly
from tests.runner.test_job import make_job, read_parts, write_prompts

OTHER = {"token": "other", "run_id": "other-run", "host": "elsewhere", "pid": 1, "heartbeat_at": 0}


def _complete_night(out, run_id: str) -> None:
    (out / run_id).mkdir(parents=True)
    (out / run_id / "_SUCCESS").write_text("{}")
    (out / run_id / "_run.json").write_text("{}")


def test_a_night_that_finds_a_newer_night_complete_once_it_holds_the_lock_does_not_run(
    tmp_path, monkeypatch, caplog
):
    """LATEST was read only before the lock: a newer night completing in between let the late night run and
    then move LATEST back to itself."""
    out = tmp_path / "out"
    out.mkdir()
    acquire = Lease.acquire

    def newer_night_completes_first(lease: Lease) -> None:
        if lease.key == "_locks/nightly.lock":  # not the run's own lock, taken if the night runs
            _complete_night(out, "nightly-2026-11-26")
            (out / "LATEST").write_text(json.dumps({"run_id": "nightly-2026-11-26"}))
        acquire(lease)

    monkeypatch.setattr(Lease, "acquire", newer_night_completes_first)
    job = make_job(tmp_path, write_prompts(tmp_path / "prompts.jsonl", 4), run__id=None)
    with caplog.at_level(logging.ERROR, logger="canvasflow"):
        assert run_nightly(job, NightlyConfig(date="2026-11-25")) == REFUSED
    assert "refusing to run nightly-2026-11-25 late: the newer night nightly-2026-11-26" in caplog.text
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-11-26"
    assert sorted(p.name for p in out.iterdir()) == ["LATEST", "_locks", "nightly-2026-11-26"]
    assert list((out / "_locks").iterdir()) == [], "the lock is released"


@pytest.mark.ray
def test_a_night_whose_lock_was_taken_over_while_it_ran_moves_no_pointer_and_deletes_nothing(
    tmp_path, ray_local, monkeypatch, caplog
):
    """The heartbeat (every lock_stale_s / 4) had not seen the takeover yet when the run ended: the night moved
    LATEST and applied retention under another night's lock."""
    out = tmp_path / "out"
    _complete_night(out, "nightly-2026-10-01")  # older than the retention: the night would delete it
    (out / "LATEST").write_text(json.dumps({"run_id": "nightly-2026-10-01"}))
    run = job_module.run

    def taken_over_while_running(job, **kwargs) -> int:
        code = run(job, **kwargs)
        (out / "_locks" / "nightly.lock").write_text(json.dumps(OTHER))
        return code

    monkeypatch.setattr(job_module, "run", taken_over_while_running)
    job = make_job(tmp_path, write_prompts(tmp_path / "prompts.jsonl", 4), run__id=None)
    with caplog.at_level(logging.ERROR, logger="canvasflow"):
        assert run_nightly(job, NightlyConfig(date="2026-11-25", retention_days=30)) == 1
    assert "lost " in caplog.text and "it stops writing what the lock guards" in caplog.text
    assert "nightly-2026-11-25: not moving LATEST nor applying retention" in caplog.text
    assert (out / "nightly-2026-11-25" / "_SUCCESS").exists(), "the run itself completed"
    assert json.loads((out / "LATEST").read_text())["run_id"] == "nightly-2026-10-01"
    assert (out / "nightly-2026-10-01" / "_SUCCESS").exists()
    assert json.loads((out / "_locks" / "nightly.lock").read_text()) == OTHER, "not released: not ours"


@pytest.mark.ray
def test_a_driver_whose_run_lock_was_taken_over_does_not_finalize_the_run(
    tmp_path, ray_local, monkeypatch, caplog
):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    run_dir = tmp_path / "out" / "test-run"
    run_workers = job_module._run_workers

    def taken_over_while_running(*args, **kwargs):
        result = run_workers(*args, **kwargs)
        (run_dir / job_module.RUN_LOCK).write_text(json.dumps(OTHER))
        return result

    monkeypatch.setattr(job_module, "_run_workers", taken_over_while_running)
    with caplog.at_level(logging.ERROR, logger="canvasflow"):
        assert job_module.run(make_job(tmp_path, data)) == 1
    assert "was taken over by another process (now: elsewhere pid 1)" in caplog.text
    assert "not finalizing it (exit code 1)" in caplog.text
    assert not (run_dir / "_SUCCESS").exists() and not (run_dir / "_manifest.json").exists()
    assert read_parts(run_dir).num_rows == 8, "what the workers committed is kept"
    assert json.loads((run_dir / job_module.RUN_LOCK).read_text()) == OTHER, "not released: not ours"
