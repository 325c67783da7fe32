"""The local Ray instance of a job (cluster.mode=local, pipeline/runner/ray_setup.py) authenticates with a token of
its own, which its processes hold in their environment and no file does.

Ray's default for a new local instance wrote ~/.ray/auth_token with mode 0644 and reused it for every later
instance: any user of the machine who read it could connect to the job's Ray services (they listen on all
interfaces) and run code as the job's user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

# Starts the job's local instance as the job does, then connects to it from other processes: without a token,
# and with the one its GCS server's environment holds (readable by the same user only, as /proc/PID/environ is).
SCRIPT = """
import json, os, subprocess, sys
import psutil, ray
from pipeline.config.schema import ClusterConfig
from pipeline.runner import ray_setup

ray_setup.connect(ClusterConfig(mode="local", num_workers=1))
address = ray.get_runtime_context().gcs_address
gcs = [p for p in psutil.Process().children(recursive=True) if "gcs_server" in " ".join(p.cmdline())]
token = gcs[0].environ().get("RAY_AUTH_TOKEN", "")
client = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print('connected')"
# One connection attempt (Ray retries a refused one for 20 s)
clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_gcs_server_port_wait_time_s": "1"}
codes = {}
for label, extra in (("no token", {}), ("its token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})):
    run = subprocess.run([sys.executable, "-c", client], env={**clean, **extra}, capture_output=True, timeout=120)
    codes[label] = run.returncode
print(json.dumps({"codes": codes, "token_length": len(token), "left_in_driver": "RAY_AUTH_TOKEN" in os.environ}))
ray.shutdown()
"""


def test_the_local_instance_takes_only_its_own_token_and_writes_none_to_disk(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["token_length"] == 64, "the instance's processes hold a 256-bit token of its own"
    assert report["codes"]["no token"] != 0, "a client without the token is refused"
    assert report["codes"]["its token"] == 0, "the instance's token connects"
    assert not report["left_in_driver"], (
        "the token is in the instance's environment, not left in the driver's"
    )
    assert not (home / ".ray" / "auth_token").exists(), "no token file (Ray's default writes one, mode 0644)"
