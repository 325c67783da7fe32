"""Ctrl-C (SIGINT) during a run: the driver stops with a line saying that committed shards are kept and how
to resume, exit code 130, the run lock released; no KeyboardInterrupt traceback (it printed ~30 lines of
Ray internals ending in `ray.wait`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runner.test_faults import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_ctrl_c_mid_run_exits_130_without_a_traceback_and_releases_the_lock(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse: word{i}"}) + "\n" for i in range(400)))
    run_dir = tmp_path / "out" / "r1"
    args = [f"data.path={data}", f"output.uri={tmp_path / 'out'}", "run.id=r1", "run.shard_size=8"]
    args += ["cluster.num_workers=1", "run.progress_interval_s=1"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        commits = run_dir / "_commits"
        wait_for(lambda: commits.exists() and any(commits.iterdir()), 300, "a first commit")
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of this run's process group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "interrupted" in log and "rerun the same command to resume" in log
    assert not (run_dir / "_lock").exists()
    assert not (run_dir / "_SUCCESS").exists()
