"""Crashes and bad input, through the real command line, on local disk and on a real S3 server (SeaweedFS).

Every test ends by checking the contract: each input row exactly once, in data/ or errors/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

COMMON = [
    "model.path=builtin:tiny-diffusiongemma-random",
    "sampler.max_denoising_steps=4",
    "sampler.max_new_tokens=32",
    "cluster.num_workers=1",
    "run.progress_interval_s=1",
]


class Output:
    """Where a test run writes, on local disk or S3, and how the test reads it back (not via the code under test)."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        if kind == "local":
            self.root = tmp_path / "out"
            self.uri, self.args = str(self.root), []
        else:
            bucket = request.getfixturevalue("s3_bucket")
            self.bucket = bucket
            self.uri = f"{bucket.uri}/runs"
            self.args = ["output=s3", f"output.endpoint_url={bucket.endpoint}"]
        self.cli = [f"output.uri={self.uri}", *self.args]

    def keys(self, run_id: str) -> list[str]:
        if self.kind == "local":
            base = self.root / run_id
            return (
                sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
                if base.exists()
                else []
            )
        prefix = f"runs/{run_id}/"
        return [k[len(prefix) :] for k in self.bucket.keys() if k.startswith(prefix)]  # noqa: SIM118 (a bucket)

    def read(self, run_id: str, key: str) -> bytes:
        if self.kind == "local":
            return (self.root / run_id / key).read_bytes()
        body = self.bucket.server.client().get_object(Bucket=self.bucket.name, Key=f"runs/{run_id}/{key}")[
            "Body"
        ]
        return body.read()

    def rows(self, run_id: str, folder: str) -> list[dict]:
        out = []
        for key in self.keys(run_id):
            if key.startswith(f"{folder}/") and key.endswith(".parquet"):
                out.extend(pq.read_table(io.BytesIO(self.read(run_id, key))).to_pylist())
        return out

    def commits(self, run_id: str) -> dict[str, dict]:
        """The commit markers; a worker killed while writing one leaves a temporary file (.tmp-*) beside them,
        which is no marker (the rerun removes it)."""
        return {
            k: json.loads(self.read(run_id, k))
            for k in self.keys(run_id)
            if k.startswith("_commits/") and not k.startswith("_commits/.tmp-")
        }


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def output(request, tmp_path):
    return Output(request.param, tmp_path, request)


def write_prompts(path: Path, count: int, extra: list[str] | None = None) -> Path:
    lines = [json.dumps({"prompt": f"Sort: {i % 10} {i % 7} {i % 3}", "k": i}) for i in range(count)]
    path.write_text("\n".join(lines + (extra or [])) + "\n")
    return path


def start_job(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Polls `predicate` until it holds; fails at once, with its output, if `proc` exits before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            log = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}:\n{log[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def workers(job: subprocess.Popen) -> list[psutil.Process]:
    """The Ray worker processes of this job only: its local Ray instance's processes stay in the session the job
    started (start_job), also once the driver is gone; other tests' jobs may be running beside it."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("ShardWorker" in c for c in p.info["cmdline"] or []):
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.getsid(p.pid) == job.pid:
                    found.append(p)
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """Test hygiene after a SIGKILL: Ray's agents of the killed driver outlive it; end its whole group, and
    wait until no worker of it is left (a worker may still commit the shard it was writing, which is fine:
    the test counts commits only once nothing can write any more)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while workers(proc) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in workers(proc):
        p.kill()


def assert_exactly_once(output: Output, run_id: str, expected_rows: int) -> tuple[list[dict], list[dict]]:
    keys = output.keys(run_id)
    assert "_SUCCESS" in keys and "_manifest.json" in keys
    data, errors = output.rows(run_id, "data"), output.rows(run_id, "errors")
    indices = sorted(r["source_index"] for r in data + errors)
    assert indices == list(range(expected_rows)), "every input row exactly once, as an output or an error row"
    assert len({r["id"] for r in data}) == len(data)
    manifest = json.loads(output.read(run_id, "_manifest.json"))
    listed = {p["data_key"] for p in manifest["parts"] if p["data_key"]}
    assert listed == {k for k in keys if k.startswith("data/")}, "data/ holds the committed parts only"
    return data, errors


def test_full_run_with_every_bad_row_kind(output, tmp_path):
    extra = [
        "{malformed",
        json.dumps({"prompt": None, "uid": "n"}),
        json.dumps({"prompt": ["x"], "uid": "l"}),
        json.dumps({"prompt": "   ", "uid": "w"}),
        json.dumps({"other": "x", "uid": "m"}),
        json.dumps({"prompt": "y" * 300, "uid": "y"}),
        json.dumps({"prompt": "dup", "uid": "k3"}),
    ]
    lines = [
        json.dumps({"prompt": f"Sort: {i % 10} {i % 7} {i % 3}", "k": i, "uid": f"k{i}"}) for i in range(10)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines + extra) + "\n")
    with open(source, "ab") as f:
        f.write(b'{"prompt": "bad \xff utf-8", "uid": "u"}\n')
    data_path = str(source)
    if output.kind == "s3":  # the input comes from the object store too
        output.bucket.put("inputs/in.jsonl", source.read_bytes())
        data_path = f"{output.bucket.uri}/inputs/in.jsonl"
    args = [
        f"data.path={data_path}",
        "data.id_column=uid",
        "run.id=r",
        "run.shard_size=4",
        "model.max_prompt_tokens=128",
        *COMMON,
        *output.cli,
    ]
    code, log = finish(start_job(args, tmp_path))
    assert code == 0, log[-3000:]
    data, errors = assert_exactly_once(output, "r", 18)
    assert len(data) == 10 and len(errors) == 8
    assert sorted(r["id"] for r in data) == sorted(f"k{i}" for i in range(10)), "declared ids are kept"
    reasons = {e["source_index"]: e["reason"] for e in errors}
    expected = {
        10: "malformed JSON",
        11: "is null",
        12: "must be a string",
        13: "is empty",
        14: "missing column 'prompt'",
        15: "more than fit",
        16: "duplicate id 'k3'",
        17: "invalid UTF-8",
    }
    for index, text in expected.items():
        assert text in reasons[index], (index, reasons[index])
    for row in data:  # read back row by row
        assert row["completion_tokens"] == len(row["completion"]) or row["completion_tokens"] > 0
        assert row["run_id"] == "r" and json.loads(row["metadata"])["k"] == row["source_index"]
    stats = json.loads(output.read("r", "stats.json"))
    assert stats["rows_in"] == 18 and stats["rows_error"] == 8
    assert stats["errors_by_stage"] == {"read": 7, "tokenize": 1}
    if output.kind == "s3":  # the credentials came from the environment and went nowhere
        secret = output.bucket.server.secret_key
        assert secret not in log
        for key in output.keys("r"):
            assert secret.encode() not in output.read("r", key), key


def test_worker_killed_mid_run_is_retried(output, tmp_path):
    data_file = write_prompts(tmp_path / "in.jsonl", 24)
    proc = start_job(
        [f"data.path={data_file}", "run.id=w", "run.shard_size=3", *COMMON, *output.cli], tmp_path
    )
    killed = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(output.commits("w")) >= 2:
                for p in workers(proc):
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                if killed:
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    code, log = finish(proc)
    killer.join()
    assert killed, "a worker process was killed mid-run"
    assert code == 0, log[-3000:]
    assert re.search(r"worker \d+ died holding shard\(s\) \d+ \(attempt 1/\d+\)", log), log[-3000:]
    assert_exactly_once(output, "w", 24)
    assert any(c["attempt"] > 1 for c in output.commits("w").values())


def test_driver_killed_then_rerun_resumes_without_redoing_committed_shards(output, tmp_path):
    data_file = write_prompts(tmp_path / "in.jsonl", 24)
    args = [f"data.path={data_file}", "run.id=d", "run.shard_size=2", *COMMON, *output.cli]
    first = start_job(args, tmp_path)
    wait_for(lambda: len(output.commits("d")) >= 3, 300, "three committed shards", first)
    first.send_signal(signal.SIGKILL)  # the driver only: no cleanup handler runs
    first.wait(timeout=30)
    kill_group(first)
    before = output.commits("d")
    assert 3 <= len(before) < 12 and "_SUCCESS" not in output.keys("d")

    code, log = finish(start_job(args, tmp_path))
    assert code == 0, log[-3000:]
    assert_exactly_once(output, "d", 24)
    stats = json.loads(output.read("d", "stats.json"))
    assert stats["shards"]["skipped_already_committed"] == len(before)
    assert stats["shards"]["committed_this_invocation"] == 12 - len(before)
    after = output.commits("d")
    for key, commit in before.items():  # committed shards were not regenerated
        assert after[key]["committed_at"] == commit["committed_at"]
    print(
        f"kill-and-resume ({output.kind}): {len(before)} shards committed before SIGKILL, "
        f"{stats['shards']['committed_this_invocation']} generated on rerun, {stats['rows_out']} rows, no duplicates"
    )


def crashing_job(output: Output, tmp_path: Path, run_id: str, crasher: str) -> tuple[int, str]:
    """12 rows in shards of 2; row 7 (shard 3) breaks its worker as `crasher` says."""
    data_file = write_prompts(tmp_path / "in.jsonl", 12)
    text = data_file.read_text().splitlines()
    text[7] = json.dumps({"prompt": "Sort: 1 2 CRASH", "k": 7})
    data_file.write_text("\n".join(text) + "\n")
    return finish(
        start_job(
            [
                f"data.path={data_file}",
                f"run.id={run_id}",
                "run.shard_size=2",
                "run.max_shard_attempts=2",
                "postprocess=task_checker",
                f"postprocess._target_=tests.support.crashers.{crasher}",
                "~postprocess.drop_incorrect",
                "+postprocess.marker=CRASH",
                *COMMON,
                *output.cli,
            ],
            tmp_path,
        )
    )


# On S3 only: the search is the pool's (on local disk in tests/runner/test_pool.py); this is the whole job's.
@pytest.mark.parametrize("output", [pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
def test_a_row_that_kills_its_worker_every_time_becomes_an_error_row(output, tmp_path):
    code, log = crashing_job(output, tmp_path, "f", "crash_on")
    assert code == 0, log[-3000:]
    assert "shard 3 killed its worker on each of its 2 attempts" in log, log[-3000:]
    assert "row 7 (id " in log and "of shard 3 killed its worker on each of its 2 attempts alone" in log
    data, errors = assert_exactly_once(output, "f", 12)
    assert [(e["source_index"], e["stage"]) for e in errors] == [(7, "worker")], errors
    assert "killed its worker on each of its 2 attempts, alone on the worker" in errors[0]["reason"]
    assert errors[0]["raw"] == "Sort: 1 2 CRASH"
    assert sorted(r["source_index"] for r in data) == [i for i in range(12) if i != 7]
    stats = json.loads(output.read("f", "stats.json"))
    assert stats["errors_by_stage"] == {"worker": 1} and stats["shards"]["failed"] == []
    assert "worker: 1" in output.read("f", "README.md").decode()
    # The samplers' counters include the workers that died (their last report to the progress board): every
    # committed row's passes were computed by some worker of this invocation. Sure to have reported: the first
    # worker (at each commit before row 7 killed it) and the last (at its commit); a replacement that row 7
    # killed before its first report (they go once a second) is not counted.
    counters = stats["this_invocation"]["sampler"]["counters"]
    assert counters["workers"] >= 2 and counters["decoder_row_steps"] >= stats["denoising_steps"]


def test_a_shard_that_keeps_failing_is_reported_and_committed_work_is_kept(tmp_path):
    """Row 7 kills its worker unless it is the first row the worker sees: not when it runs alone on a fresh
    worker, so the search pins it on no row, and its shard is given up on."""
    output = Output("local", tmp_path, None)
    code, log = crashing_job(output, tmp_path, "f", "crash_on_unless_first")
    assert code == 1, log[-3000:]
    assert "shard 3 failed 2 times" in log and "Rerun the same command to retry" in log
    assert "no row of it kills its worker alone" in log
    keys = output.keys("f")
    assert "_SUCCESS" not in keys and "_manifest.json" not in keys
    assert sorted(output.commits("f")) == [f"_commits/shard-{i:05d}.json" for i in (0, 1, 2, 4, 5)]
    stats = json.loads(output.read("f", "stats.json"))
    assert stats["shards"]["failed"] == [3]
    assert sorted(r["source_index"] for r in output.rows("f", "data")) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]


def test_a_hung_worker_is_replaced_after_the_shard_timeout(tmp_path):
    output = Output("local", tmp_path, None)
    data_file = write_prompts(tmp_path / "in.jsonl", 8)
    text = data_file.read_text().splitlines()
    text[5] = json.dumps({"prompt": "Sort: 1 2 HANG", "k": 5})  # shard 2 (rows 4-5) hangs, first time only
    data_file.write_text("\n".join(text) + "\n")
    flag = tmp_path / "hung-once"
    code, log = finish(
        start_job(
            [
                f"data.path={data_file}",
                "run.id=h",
                "run.shard_size=2",
                "run.shard_timeout_s=8",
                "postprocess=task_checker",
                "postprocess._target_=tests.support.crashers.hang_once_on",
                "~postprocess.drop_incorrect",
                "+postprocess.marker=HANG",
                f"+postprocess.flag={flag}",
                *COMMON,
                *output.cli,
            ],
            tmp_path,
        )
    )
    assert code == 0, log[-3000:]
    assert flag.exists(), "the marked row hung its worker once"
    assert "shard 2 on worker 0 still running after run.shard_timeout_s=8s (attempt 1/3)" in log
    assert_exactly_once(output, "h", 8)
    # The shard the worker held beside it (run.shards_in_flight=2) went down with it and was retried too.
    held = re.search(r"\(shard\(s\) (\d+) it also held are retried\)", log)
    retried = {2} | ({int(held[1])} if held else set())
    attempts = {k: c["attempt"] for k, c in output.commits("h").items()}
    assert attempts == {f"_commits/shard-{i:05d}.json": 2 if i in retried else 1 for i in range(4)}


@pytest.mark.s3
def test_endpoint_refusing_connections_is_retried(s3_bucket, s3_fault_proxy, tmp_path):
    data_file = write_prompts(tmp_path / "in.jsonl", 12)
    args = [
        f"data.path={data_file}",
        "run.id=e",
        "run.shard_size=2",
        *COMMON,
        "output=s3",
        f"output.uri={s3_bucket.uri}/runs",
        f"output.endpoint_url={s3_fault_proxy.endpoint}",
    ]
    proc = start_job(args, tmp_path)
    out = Output.__new__(Output)
    out.kind, out.bucket = "s3", s3_bucket
    wait_for(lambda: len(out.commits("e")) >= 1, 300, "a first commit", proc)
    s3_fault_proxy.refuse_connections(4)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    assert "retry" in log, "the outage was met and retried"
    assert_exactly_once(out, "e", 12)


@pytest.mark.s3
def test_a_run_reads_each_commit_marker_once(s3_bucket, s3_fault_proxy, tmp_path):
    """The driver read every marker after the workers and again to finalize: two GETs per shard on S3 (with the
    start's read on a resume, three: 83 of 96 s of a resume of 10,000 shards)."""
    data_file = write_prompts(tmp_path / "in.jsonl", 12)
    args = [f"data.path={data_file}", "run.id=m", "run.shard_size=2", *COMMON, "output=s3"]
    args += [f"output.uri={s3_bucket.uri}/runs", f"output.endpoint_url={s3_fault_proxy.endpoint}"]
    code, log = finish(start_job(args, tmp_path))
    assert code == 0, log[-3000:]
    assert s3_fault_proxy.count("GET", "/runs/m/_commits/") == 6, "one GET per shard's marker"
    out = Output.__new__(Output)
    out.kind, out.bucket = "s3", s3_bucket
    assert_exactly_once(out, "m", 12)


def test_unreachable_output_fails_at_startup(tmp_path):
    data_file = write_prompts(tmp_path / "in.jsonl", 3)
    code, log = finish(
        start_job(
            [
                f"data.path={data_file}",
                "output=s3",
                "output.uri=s3://no-such-bucket/x",
                "output.endpoint_url=http://127.0.0.1:9",
                *COMMON,
            ],
            tmp_path,
        ),
        timeout=300,
    )
    assert code == 2, log[-3000:]
    assert "s3://no-such-bucket/x" in log
    assert "starting a local Ray" not in log, "the job stopped before any worker was started"
