"""Connecting to Ray (a local instance, or the cluster a job was submitted to) and sizing worker actors."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipeline.config.schema import ClusterConfig
from pipeline.config.validate import without_userinfo

logger = logging.getLogger("canvasflow")
HOST_PORT = re.compile(r"^(?:ray://)?([^/:]+|\[[0-9A-Fa-f:]+\]):(\d+)/?$")
PROBE_TIMEOUT_S = 10.0
RAY_ADDRESS = "RAY_ADDRESS"  # the environment variable ray.init reads


class ClusterConnectError(RuntimeError):
    """The Ray cluster at cluster.address cannot be reached; the message names the address and the fix."""


PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def connect(cluster: ClusterConfig) -> bool:
    """Initialises Ray unless this process already did; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        _init(ray, cluster)
    except SystemExit as e:
        # ray.init's own handler (sys.exit(SIGTERM)) was in place: a SIGTERM while Ray started. Stop as the
        # job's handler would have (exit code 143, finally blocks run), not with exit code 15.
        if e.code == signal.SIGTERM and callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)
            with contextlib.suppress(Exception):  # what ray.init had started
                shutdown(ray)
            sigterm(signal.SIGTERM, None)
        raise
    if main_thread and callable(sigterm):  # ray.init replaces it with sys.exit(15): keep the job's own
        signal.signal(signal.SIGTERM, sigterm)
    return True


def shutdown(ray) -> None:
    """`ray.shutdown()`, leaving this process's SIGINT and SIGTERM handling as it was. Ray's core worker, as it
    stops, resets SIGTERM to the default action in the kernel (the uninstall of its failure signal handler)
    while Python still reports the job's handler: a SIGTERM after the workers had stopped (Kubernetes stopping
    the pod while the run is finalized or its lock released) killed the process on the spot, with no line
    and the run lock left behind. The handlers Python holds are given back to the kernel here."""
    ray.shutdown()
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: not set from Python, nothing to give back
            signal.signal(signum, handler)


def _init(ray, cluster: ClusterConfig) -> None:
    if cluster.mode == "local":
        python_path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        cpus = max(os.cpu_count() or 1, math.ceil(cluster.num_workers * cluster.num_cpus_per_worker) + 1)
        if os.environ.get(RAY_ADDRESS):
            logger.warning(
                "%s is set, but cluster.mode=local starts a Ray instance of its own on this machine; to run on "
                "that cluster, pass cluster=ray",
                RAY_ADDRESS,
            )
        logger.info("starting a local Ray instance (%d CPUs)", cpus)
        # address="local": a new instance always. Without it, ray.init joins the cluster named by RAY_ADDRESS or
        # by the last `ray start` on this machine, and then refuses num_cpus.
        env = {"PYTHONPATH": python_path, "TOKENIZERS_PARALLELISM": "false", **_instance_token()}
        with _environment(env), _quiet_default_token_auth():
            try:
                ray.init(
                    address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING
                )
            except Exception as e:  # noqa: BLE001 - Ray's own (RuntimeError, OSError, ...): the job did not start
                with contextlib.suppress(Exception):  # what it had started
                    shutdown(ray)
                raise ClusterConnectError(
                    f"could not start a local Ray instance: {type(e).__name__}: {e}. Ray writes its session files "
                    f"under {_ray_temp_dir()}/ray: check that this folder is writable and has room (a few hundred "
                    "MB), or point RAY_TMPDIR (or TMPDIR) at one that is"
                ) from None
    else:
        logger.info("connecting to the Ray cluster at %s", cluster.address)
        named = check_reachable(cluster.address)
        try:
            ray.init(address=cluster.address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as e:  # e.g. address=auto and no cluster running
            if "InvalidAuthToken" in f"{e} {e.__cause__}":
                raise ClusterConnectError(_token_refused(named)) from None
            raise ClusterConnectError(f"cannot connect to the Ray cluster at {named}: {e}") from None


def _token_refused(named: str) -> str:
    """What to do when the cluster's GCS refused this process's token (or its lack of one). ray.init says only
    "Failed to connect to Ray cluster at HOST:PORT", after about 20 s of warnings from Ray's C++ client."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        why = "the cluster uses token authentication and this process sent no token (RAY_AUTH_MODE is not 'token')"
    else:
        why = "the cluster refused this process's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    return (
        f"cannot connect to the Ray cluster at {named}: {why}. Export RAY_AUTH_MODE=token and the cluster's "
        "token as RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH naming the file that holds it (default ~/.ray/auth_token)"
    )


def _ray_temp_dir() -> str:
    """Where a local Ray instance puts its session folder: RAY_TMPDIR, else on Linux TMPDIR as set (Ray does
    not fall back as Python's tempfile does), else the system's temporary folder."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return tempfile.gettempdir()


def check_reachable(address: str | None) -> str:
    """ClusterConnectError unless something listens at a host:port (or ray://host:port) address: ray.init
    retries an address without a Ray head for minutes, ignoring Ctrl-C. 'auto' (or none) stands for RAY_ADDRESS
    when that is set, as in ray.init; else ('auto' alone) the finding is left to Ray. Returns how errors name
    the address: the key and value it came from."""
    named = f"cluster.address={address!r}"
    from_env = os.environ.get(RAY_ADDRESS)
    if address in (None, "auto") and from_env:
        address, named = (
            from_env,
            f"{RAY_ADDRESS}={without_userinfo(from_env)!r} (cluster.address={address!r})",
        )
        if address.startswith(("http://", "https://")):
            raise ClusterConnectError(
                f"cannot connect to the Ray cluster at {named}: that is the address of its dashboard and Jobs "
                "API, which `ray job submit` takes; a driver needs the cluster's GCS address (host:6379) or a "
                "Ray Client address (ray://host:10001). Unset RAY_ADDRESS in this shell, or set "
                "cluster.address to one of those"
            )
    match = HOST_PORT.match(address or "")
    if not match:
        return named
    host, port = match.group(1).strip("[]"), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterConnectError(
            f"cannot reach the Ray cluster at {named} ({e.strerror or e}): start its head "
            "(`ray start --head`), or give the address of a running one: host:6379 (its GCS), ray://host:10001 "
            "(Ray Client), or 'auto' in a job submitted with `ray job submit`"
        ) from None
    return named


def worker_options(cluster: ClusterConfig, count: int) -> tuple[dict[str, Any], int | None]:
    """Ray actor options for one worker and the torch thread count it should use."""
    import ray

    gpus = cluster.num_gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if not gpus and cluster.mode == "ray":
            logger.warning(
                "the Ray cluster has no GPU right now, so workers run on CPU. On an autoscaling cluster whose GPU "
                "nodes are not up yet, set cluster.num_gpus_per_worker=1 so that workers wait for GPU nodes."
            )
    options = {
        "num_cpus": cluster.num_cpus_per_worker,
        "num_gpus": gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    threads = cluster.torch_threads
    if threads is None and cluster.mode == "local" and not gpus:
        threads = max(1, (os.cpu_count() or 1) // max(count, 1))
    return options, threads


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` set in os.environ while a local Ray instance starts: its raylet, and so every worker it
    starts, inherits them. (As a job's runtime_env they would keep Ray's prestarted idle workers, which have
    none, from hosting the actors: each actor would wait for a process of its own.)"""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _instance_token() -> dict[str, str]:
    """A token of this instance's own for Ray's token authentication (its default for a new local instance),
    passed as RAY_AUTH_TOKEN to the processes that start with it. Without one Ray writes a token to
    ~/.ray/auth_token, readable by every user of the machine (mode 0644) and reused by every later instance:
    anyone who could read it could connect to the job's Ray services, which listen on all interfaces, and run
    code as its user. In the environment, only the user (and root) can read it. A token or token file the
    user chose (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is kept."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {}
    return {"RAY_AUTH_TOKEN": secrets.token_hex(32)}


@contextlib.contextmanager
def _quiet_default_token_auth():
    """Without Ray's warning that it turned token authentication on for the new local instance, its default:
    printed on every run, it named a setting (RAY_AUTH_MODE=disabled) that the user of a private, short-lived
    instance has no reason to touch. Authentication stays on; any other message of Ray's goes through."""
    logger_ = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")

    logger_.addFilter(drop)
    try:
        yield
    finally:
        logger_.removeFilter(drop)
