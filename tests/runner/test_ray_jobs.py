"""Submitting the job to a running Ray cluster with the Ray Jobs API, as docs/cluster.md tells users to.

A real head (`ray start --head`) on 127.0.0.1 with its own ports, temp dir and auth token; the job is the
tiny-model CPU job, submitted with `ray job submit --working-dir .`, followed with `ray job status` and
`ray job logs`, and its Parquet read back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    path = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if path is None:
        pytest.fail("the `ray` command is missing: pip install 'ray[default]'", pytrace=False)
    return path


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    base = tmp_path_factory.mktemp("rayhead")
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    # `python` in the job's entrypoint must be this environment's, as a cluster image's is on its PATH
    # (CI calls .venv/bin/python without activating the venv).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "OMP_NUM_THREADS": "1",
    }
    dashboard, gcs = free_port(), free_port()
    temp_dir = (
        Path("/tmp") / f"cf-ray-{secrets.token_hex(3)}"
    )  # short: Ray's socket paths have a length limit
    args = [
        ray_cli(), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=3",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with open(base / "head.log", "w") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # answering (401 without a token): up
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"ray head did not start:\n{(base / 'head.log').read_text()[-3000:]}", pytrace=False
                )
            time.sleep(1)
    yield address, env, f"127.0.0.1:{gcs}"
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    for proc in psutil.process_iter(["cmdline"]):  # the head's daemons, which outlive `ray start --block`
        if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
            proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ray_cli(), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    address, env, _ = ray_head
    out = tmp_path / "out"
    submitted = ray(
        env, "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", "canvasflow-test",
        "--no-wait", "--", "python", "jobs/generate.py", "cluster=ray", "data.limit=8", f"output.uri={out}",
        "run.id=rj", "run.shard_size=4", "cluster.num_workers=2", "model.path=builtin:tiny-diffusiongemma-random",
        "sampler.max_denoising_steps=4", "sampler.max_new_tokens=32",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.monotonic() + 480
    while True:
        status = ray(env, "job", "status", "--address", address, "canvasflow-test")
        text = status.stdout + status.stderr
        if "succeeded" in text or "failed" in text.lower() or time.monotonic() > deadline:
            break
        time.sleep(3)
    logs = ray(env, "job", "logs", "--address", address, "canvasflow-test").stdout
    assert "Job 'canvasflow-test' succeeded" in text, text[-2000:] + logs[-3000:]
    assert "connecting to the Ray cluster at auto" in logs
    assert "progress: 8/8 rows" in logs and "done: 8 rows in -> 8 rows out" in logs
    table = pads.dataset(str(out / "rj" / "data"), format="parquet").to_table()
    assert table.num_rows == 8
    stats = json.loads((out / "rj" / "stats.json").read_text())
    assert set(stats["per_worker"]) == {"w0", "w1"}


def test_a_local_job_beside_a_running_cluster_starts_a_ray_instance_of_its_own(ray_head, tmp_path):
    """RAY_ADDRESS names a live cluster (as on a cluster's node, or after `export RAY_ADDRESS`): cluster=local
    joined it and failed in ray.init ("num_cpus ... must not be provided"); it now starts its own, saying so."""
    _, env, gcs = ray_head
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Sort: {i} 3 1"}) + "\n" for i in range(4)))
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "jobs" / "generate.py"), f"data.path={data}", f"output.uri={tmp_path / 'out'}",
            "run.id=beside", "cluster.num_workers=1", "model.path=builtin:tiny-diffusiongemma-random",
            "sampler.max_denoising_steps=4", "sampler.max_new_tokens=32",
        ],
        env={**env, "RAY_ADDRESS": gcs}, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "RAY_ADDRESS is set, but cluster.mode=local starts a Ray instance of its own" in log
    assert "starting a local Ray instance" in log
    assert pads.dataset(str(tmp_path / "out" / "beside" / "data"), format="parquet").count_rows() == 4


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        ({}, "the cluster uses token authentication and this process sent no token"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "the cluster refused this process's token"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_a_driver_without_the_clusters_token_is_told_so(ray_head, tmp_path, auth, why):
    """A driver connecting to a cluster with token authentication without its token (or with another) failed
    saying only "cannot connect to the Ray cluster at cluster.address='127.0.0.1:PORT': Failed to connect to
    Ray cluster at HOST:PORT", as if the cluster were down; it now names the token and how to pass it."""
    _, env, gcs = ray_head
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")} | auth
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # ray.init's tries at a refused connection: 20 by default
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "jobs" / "generate.py"), "cluster=ray", f"cluster.address={gcs}",
            f"output.uri={tmp_path / 'out'}", "run.id=notoken", "data.limit=4",
            "model.path=builtin:tiny-diffusiongemma-random",
        ],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert f"cannot connect to the Ray cluster at cluster.address='{gcs}': {why}" in log, log[-3000:]
    assert "Export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN" in log
