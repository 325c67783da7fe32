"""Ctrl-C (SIGINT) or SIGTERM (Kubernetes, `ray job stop`) during a run: the driver stops with a line saying
that committed shards are kept and how to resume, exit code 130 or 143, the run lock released; no traceback
(Ctrl-C printed ~30 lines of Ray internals ending in `ray.wait`; SIGTERM exited 15 through Ray's handler, or,
before Ray started, died leaving the lock for another host to wait out)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.runner.job import run
from pipeline.runner.nightly import resume_note
from tests.runner.test_faults import ROOT, start_job, wait_for


def test_ctrl_c_exits_130_with_one_line(capsys):
    """Ctrl-C and SIGTERM take the same path out of the job (KeyboardInterrupt; the run below sends SIGTERM
    through a real run); without SIGTERM's note the exit is Ctrl-C's."""
    from pipeline.config.store import run_cli

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, lambda: True, "jobs/generate.py")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == (
        "interrupted (exit code 130): every committed shard is kept; rerun the same command to resume the run\n"
    )


def test_an_interrupted_night_says_which_night_to_rerun(tmp_path, capsys, monkeypatch):
    """ "rerun the same command" resumed an interrupted night only before midnight: a nightly without
    nightly.date then runs the next night, and the interrupted one stays incomplete."""
    import pipeline.runner.job as job_module
    from pipeline.config.schema import JobConfig, NightlyConfig, OutputConfig
    from pipeline.config.store import run_cli
    from pipeline.runner.nightly import run_nightly

    def interrupted(*args, **kwargs):  # Ctrl-C while the night's job runs
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "run", interrupted)
    job = JobConfig(output=OutputConfig(uri=str(tmp_path / "out")))
    nightly = NightlyConfig(date="2026-11-26", timezone="UTC")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            lambda: run_nightly(job, nightly), lambda: True, "jobs/nightly.py", interrupted_note=resume_note
        )
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == (
        "interrupted (exit code 130): every committed shard is kept; rerun with nightly.date=2026-11-26 to resume "
        "this night (without it, a rerun after midnight runs the next night)\n"
    )
    assert not (tmp_path / "out" / "_locks" / "nightly.lock").exists(), "the night's lock is released"


@pytest.mark.ray
@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGTERM, 143, "terminated by SIGTERM")], ids=["sigterm"]
)
def test_a_signal_mid_run_exits_with_one_line_and_releases_the_lock(tmp_path, signum, code, said):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse: word{i}"}) + "\n" for i in range(400)))
    run_dir = tmp_path / "out" / "r1"
    args = [f"data.path={data}", f"output.uri={tmp_path / 'out'}", "run.id=r1", "run.shard_size=8"]
    args += ["cluster.num_workers=1", "run.progress_interval_s=1"]
    proc = start_job(args, tmp_path)
    try:
        commits = run_dir / "_commits"
        wait_for(lambda: commits.exists() and any(commits.iterdir()), 300, "a first commit", proc)
        proc.send_signal(signum)
        log, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of this run's process group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == code, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert said in log and "rerun the same command to resume" in log
    assert not (run_dir / "_lock").exists()
    assert not (run_dir / "_SUCCESS").exists()


@pytest.mark.ray
def test_sigterm_while_ray_starts_exits_143_and_releases_the_lock(tmp_path):
    """ray.init puts in its own SIGTERM handler (sys.exit(15)) while it starts a local instance, a few seconds:
    a SIGTERM then exited 15 without a word, instead of 143."""
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    run_dir = tmp_path / "out" / "r1"
    proc = start_job([f"data.path={data}", f"output.uri={tmp_path / 'out'}", "run.id=r1"], tmp_path)
    try:
        seen = []
        for line in proc.stdout:  # the driver logs this line just before ray.init
            seen.append(line)
            if "starting a local Ray instance" in line:
                break
        assert seen and "starting a local Ray instance" in seen[-1], "".join(seen)[-3000:]
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == 143, "".join(seen) + log[-3000:]
    assert "terminated by SIGTERM (exit code 143)" in log and "Traceback" not in log
    assert not (run_dir / "_lock").exists()


@pytest.mark.ray
def test_ctrl_c_while_ray_stops_or_the_lock_is_released_lets_each_step_finish_first(
    tmp_path, ray_local, monkeypatch, capfd
):
    """A second Ctrl-C, arriving while the first one's way out stopped Ray, cut `ray.shutdown()` short: Ray's
    agents were left running and the process exited 1 ("some shards failed") just after saying "exit code 130".
    One that cut the lock's release short left the lock behind. Each step now ends first, then the signal acts."""
    import ray

    import pipeline.runner.ray_setup as ray_setup
    from pipeline.io.lease import Lease
    from tests.runner.test_job import make_job, write_prompts

    data = write_prompts(tmp_path / "prompts.jsonl", 4)
    steps = []
    monkeypatch.setattr(ray_setup, "connect", lambda cluster: True)  # as if this job had started Ray

    def shutdown():  # Ctrl-C while Ray stops
        signal.raise_signal(signal.SIGINT)
        steps.append("Ray stopped")

    release = Lease.release

    def interrupted_release(self):  # and again while the run lock is released
        signal.raise_signal(signal.SIGINT)
        release(self)
        steps.append("lock released")

    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(Lease, "release", interrupted_release)
    with pytest.raises(KeyboardInterrupt):
        run(make_job(tmp_path, data, cluster__num_workers=1))
    assert steps == ["Ray stopped", "lock released"]
    assert not (tmp_path / "out" / "test-run" / "_lock").exists()
    # Written with os.write (the signal may land inside a write to sys.stderr): on file descriptor 2.
    assert "Ctrl-C: stopping Ray first (a moment); Ctrl-C again to stop at once" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_again_while_a_step_is_deferred_stops_it_at_once():
    from pipeline.config.store import signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt), signals_deferred("stopping Ray"):
        signal.raise_signal(signal.SIGINT)
        steps.append("went on")
        signal.raise_signal(signal.SIGINT)
        steps.append("not reached")
    assert steps == ["went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


TWO_SIGTERMS = """
import os, runpy, signal, sys
import pipeline.runner.job as job
from pipeline.io.lease import Lease

counters, release = job.sampler_counters, Lease.release

def sampler_counters(*args):  # the workers are done, Ray not yet stopped: SIGTERM (Kubernetes, `kill`)
    os.kill(os.getpid(), signal.SIGTERM)
    return counters(*args)

def interrupted_release(self):  # Ray stopped: SIGTERM again, as the run lock is released
    os.kill(os.getpid(), signal.SIGTERM)
    release(self)
    print("lock released", flush=True)

job.sampler_counters, Lease.release = sampler_counters, interrupted_release
sys.argv = ["jobs/generate.py", *sys.argv[1:]]
runpy.run_path("jobs/generate.py", run_name="__main__")
"""


@pytest.mark.ray
def test_a_second_sigterm_after_ray_stopped_is_ignored_as_the_first_one_asked(tmp_path):
    """The first SIGTERM makes the job ignore any other while it stops (Python's handler table says SIG_IGN);
    but stopping Ray resets SIGTERM to the default action in the kernel, so a second one after that killed the
    process on the spot (exit -15, no line), its run lock left behind."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}+1"}) + "\n" for i in range(4)))
    args = [f"data.path={data}", f"output.uri={tmp_path / 'out'}", "run.id=r1", "cluster.num_workers=1"]
    args += ["model.path=builtin:tiny-diffusiongemma-random", "sampler.max_new_tokens=32"]
    proc = subprocess.run(
        [sys.executable, "-c", TWO_SIGTERMS, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 143, log[-3000:]
    assert "lock released" in log and "terminated by SIGTERM (exit code 143)" in log, log[-3000:]
    assert not (tmp_path / "out" / "r1" / "_lock").exists()


def test_a_signal_while_the_deferral_is_set_up_leaves_no_handler_of_it_behind(monkeypatch):
    """A SIGTERM landing after signals_deferred had put its handler on SIGINT but before SIGTERM raised out of
    the setup, outside its try: SIGINT kept the deferring handler for good, so every later Ctrl-C of the process
    was swallowed once ("Ctrl-C: stopping Ray first") before it acted."""
    from pipeline.config.store import signals_deferred

    real = signal.signal

    def sigterm_arrives(signum, handler):
        if signum == signal.SIGTERM and getattr(handler, "__name__", "") == "defer":
            raise KeyboardInterrupt  # what the job's SIGTERM handler raises, here at the worst moment
        return real(signum, handler)

    monkeypatch.setattr(signal, "signal", sigterm_arrives)
    with pytest.raises(KeyboardInterrupt), signals_deferred("stopping Ray"):
        pytest.fail("the step does not run")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
