"""pipeline.models.fetch: an s3:// model is downloaded once per node (several processes at once: one
download, counted through a proxy), reused without S3, fetched again when a download was killed or a copy
damaged; local directories pass through; missing models fail with messages naming them."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import signal
import time
from pathlib import Path

import pytest

from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, split_s3_uri
from pipeline.models.fetch import MARKER, PARTIAL, cache_path, resolve_model_dir
from pipeline.models.loader import ModelError

_rng = random.Random(0)
MODEL = {
    "config.json": json.dumps({"model_type": "diffusion_gemma", "canvas_length": 16}).encode(),
    "generation_config.json": b"{}",
    "tokenizer.json": _rng.randbytes(50_000),
    "model-00001-of-00002.safetensors": _rng.randbytes(3_000_000),
    "model-00002-of-00002.safetensors": _rng.randbytes(1_200_000),
    "empty.txt": b"",
    "extra/notes.md": b"nested keys become nested files\n",
}
PREFIX = "models/tiny-v1"


@pytest.fixture
def s3_model(s3_bucket) -> str:
    for name, data in MODEL.items():
        s3_bucket.put(f"{PREFIX}/{name}", data)
    s3_bucket.put("models/tiny-v1-other/config.json", b"{}")  # a sibling prefix that must not be mixed in
    return f"{s3_bucket.uri}/{PREFIX}"


def assert_is_the_model(model_dir: str) -> None:
    root = Path(model_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted([*MODEL, MARKER])
    for name, data in MODEL.items():
        assert (root / name).read_bytes() == data, name


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(target.name + PARTIAL))


def object_gets(proxy) -> int:
    return proxy.count("GET", path_contains=f"/{PREFIX}/")  # object paths; the listing is /bucket?list-type=2


def objects_fetched(proxy) -> set[str]:
    """The model files GET since the proxy's counts were reset."""
    return {
        r.path.split(f"/{PREFIX}/", 1)[1]
        for r in list(proxy.requests)
        if r.method == "GET" and f"/{PREFIX}/" in r.path
    }


# -- local ---------------------------------------------------------------------------------------------------


def test_local_directory_passes_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path), cache_dir=None, endpoint_url=None, region=None) == str(tmp_path)


def test_local_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model.path='.*/nowhere' is not a directory"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match=r"model.path='.*' has no config.json"):
        resolve_model_dir(str(tmp_path))


# -- S3 ------------------------------------------------------------------------------------------------------


def _resolve_in_child(uri: str, cache_dir: str, endpoint: str, barrier, results) -> None:
    barrier.wait(timeout=120)  # all processes ask at the same moment, as actors starting on one node
    results.put(resolve_model_dir(uri, cache_dir=cache_dir, endpoint_url=endpoint, region="us-east-1"))


def collect(processes, results, timeout_s: float = 120) -> list[str]:
    """One result per process; fails at once when a process dies instead of waiting out the timeout."""
    found: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(found) < len(processes):
        try:
            found.append(results.get(timeout=0.5))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not failed, f"worker processes failed with exit codes {failed}"
            assert time.monotonic() < deadline, f"workers gave {len(found)} results in {timeout_s}s"
    return found


@pytest.mark.s3
def test_processes_starting_together_download_once(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    args = (s3_model, str(tmp_path / "cache"), s3_fault_proxy.endpoint, barrier, results)
    processes = [ctx.Process(target=_resolve_in_child, args=args) for _ in range(workers)]
    for process in processes:
        process.start()
    paths = collect(processes, results)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(set(paths)) == 1
    target = Path(paths[0])
    assert target == cache_path(
        s3_model, cache_dir=str(tmp_path / "cache"), endpoint_url=s3_fault_proxy.endpoint
    )
    bucket, prefix = split_s3_uri(s3_model)  # the layout: <cache>/<bucket>/<prefix>-<hash>
    assert target.parent == tmp_path / "cache" / bucket / Path(prefix).parent
    assert target.name.startswith(f"{Path(prefix).name}-")
    assert_is_the_model(paths[0])
    assert object_gets(s3_fault_proxy) == len(MODEL)  # every object fetched exactly once, by one process
    assert s3_fault_proxy.count() == len(MODEL) + 1  # plus one listing; the others made no S3 call at all
    assert leftovers(target) == []


@pytest.mark.s3
def test_completed_copy_is_reused_without_s3(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    options = {"cache_dir": str(tmp_path), "endpoint_url": s3_fault_proxy.endpoint, "region": None}
    first = resolve_model_dir(s3_model, **options)
    requests = s3_fault_proxy.count()
    s3_fault_proxy.refuse_connections(600)  # S3 is unreachable now: reuse must not need it
    assert resolve_model_dir(s3_model, **options) == first
    assert s3_fault_proxy.count() == requests
    assert_is_the_model(first)


def _download_then_die(uri: str, cache_dir: str, endpoint: str) -> None:
    real = S3Store.download_file

    def half_then_killed(self, key, dest, etag=None):
        size = real(self, key, dest, etag)
        if key.endswith("00001-of-00002.safetensors"):
            with open(dest, "r+b") as f:
                f.truncate(size // 2)  # a shard half on disk...
            os.kill(os.getpid(), signal.SIGKILL)  # ...when the node kills the process
        return size

    S3Store.download_file = half_then_killed
    resolve_model_dir(uri, cache_dir=cache_dir, endpoint_url=endpoint)


@pytest.mark.s3
def test_killed_download_never_looks_complete_and_is_redone(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    cache_dir, endpoint = str(tmp_path / "cache"), s3_fault_proxy.endpoint
    process = multiprocessing.get_context("spawn").Process(
        target=_download_then_die, args=(s3_model, cache_dir, endpoint)
    )
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    target = cache_path(s3_model, cache_dir=cache_dir, endpoint_url=endpoint)
    assert not target.exists()
    assert len(leftovers(target)) == 1  # the killed attempt's temporary directory, never renamed

    s3_fault_proxy.reset_counts()
    assert resolve_model_dir(s3_model, cache_dir=cache_dir, endpoint_url=endpoint) == str(target)
    assert_is_the_model(str(target))
    # downloaded again, completely: every file (a GET the killed process had sent may reach the proxy only
    # after the reset on a loaded machine, so the count can be one more)
    assert objects_fetched(s3_fault_proxy) == set(MODEL)
    assert leftovers(target) == []  # and the leftover was removed


@pytest.mark.s3
def test_short_download_is_rejected_and_leaves_nothing(s3_model, s3_env, tmp_path, monkeypatch) -> None:
    real = S3Store.download_file

    def short(self, key, dest, etag=None):
        size = real(self, key, dest, etag)
        if key == "tokenizer.json":
            with open(dest, "r+b") as f:
                f.truncate(size - 1)
        return size

    monkeypatch.setattr(S3Store, "download_file", short)
    with pytest.raises(ModelError, match=r"cannot be downloaded: .*tokenizer.json: got 49999 bytes.* 50000"):
        resolve_model_dir(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint)
    target = cache_path(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint)
    assert not target.exists() and leftovers(target) == []


@pytest.mark.s3
def test_a_long_download_logs_how_far_it_got(s3_model, s3_env, tmp_path, monkeypatch, caplog) -> None:
    """A checkpoint of tens of GB took minutes between "downloading" and "downloaded" with nothing logged,
    which looked like a hang. Here one weight file is held until a progress line is logged."""
    import logging
    import threading

    import pipeline.models.fetch as fetch

    logged = threading.Event()

    class Progress(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("downloading ") and " of " in record.getMessage():
                logged.set()

    real = S3Store.download_file

    def held(self, key, dest, etag=None):
        size = real(self, key, dest, etag)
        if key == "model-00001-of-00002.safetensors":
            assert logged.wait(10), "no progress line while a file was still downloading"
        return size

    monkeypatch.setattr(S3Store, "download_file", held)
    monkeypatch.setattr(fetch, "PROGRESS_S", 0.05)
    handler = Progress()
    logging.getLogger(fetch.__name__).addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger=fetch.__name__):
            assert_is_the_model(
                resolve_model_dir(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint)
            )
    finally:
        logging.getLogger(fetch.__name__).removeHandler(handler)
    progress = [r.getMessage() for r in caplog.records if " of 4.3 MB (" in r.getMessage()]
    assert progress and all(line.startswith(f"downloading {s3_model}: ") for line in progress), caplog.text


@pytest.mark.s3
def test_damaged_copy_is_fetched_again(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    options = {"cache_dir": str(tmp_path), "endpoint_url": s3_fault_proxy.endpoint}
    model_dir = Path(resolve_model_dir(s3_model, **options))
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"truncated")
    s3_fault_proxy.reset_counts()
    assert resolve_model_dir(s3_model, **options) == str(model_dir)
    assert_is_the_model(str(model_dir))
    assert object_gets(s3_fault_proxy) == len(MODEL)


@pytest.mark.s3
def test_dropped_connections_during_download_are_retried(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    s3_fault_proxy.drop_next(3, method="GET")  # the listing, then objects cut mid-body
    model_dir = resolve_model_dir(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_fault_proxy.endpoint)
    assert_is_the_model(model_dir)
    assert s3_fault_proxy.count("GET", fault="drop") == 3
    assert s3_fault_proxy.count("GET", fault=None) == len(MODEL) + 1


@pytest.mark.s3
def test_s3_errors_name_the_model(s3_bucket, tmp_path: Path) -> None:
    s3_bucket.put("no-config/model.safetensors", b"x")
    options = {"cache_dir": str(tmp_path), "endpoint_url": s3_bucket.endpoint}
    with pytest.raises(
        ModelError, match=rf"model.path='{s3_bucket.uri}/empty': no objects under this prefix"
    ):
        resolve_model_dir(f"{s3_bucket.uri}/empty", **options)
    with pytest.raises(ModelError, match=rf"model.path='{s3_bucket.uri}/no-config' has no config.json"):
        resolve_model_dir(f"{s3_bucket.uri}/no-config", **options)
    with pytest.raises(ModelError, match=r"s3://no-such-bucket-4e1d/m.*NoSuchBucket"):
        resolve_model_dir("s3://no-such-bucket-4e1d/m", **options)
    with pytest.raises(ModelError, match="must not contain empty, '.' or '..' segments"):
        resolve_model_dir(f"{s3_bucket.uri}/a/../b", **options)
    assert sorted(p.name for p in (tmp_path / s3_bucket.name).iterdir() if not p.name.endswith(".lock")) == []


@pytest.mark.s3
def test_objects_replaced_since_the_run_started_are_not_cached_under_its_version(s3_model, s3_env, tmp_path):
    """A worker started after the prefix was republished (a replacement, a resume) downloaded the new weights
    into the directory named for the run's model version, and reused it from then on: one run, two models."""
    from pipeline.runner.identity import s3_model_identity, s3_objects

    store = S3Store(s3_model, S3Options(endpoint_url=s3_env.endpoint))
    version = s3_model_identity(s3_model, s3_objects(store))  # the driver's, at the run's start
    new = _rng.randbytes(len(MODEL["model-00002-of-00002.safetensors"]))  # same size, other bytes
    store.write_bytes("model-00002-of-00002.safetensors", new)
    with pytest.raises(ModelError, match="its objects changed since the run started"):
        resolve_model_dir(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint, version=version)
    target = cache_path(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint, version=version)
    assert not target.exists() and leftovers(target) == []
    current = s3_model_identity(s3_model, s3_objects(store))  # a new run's
    model_dir = resolve_model_dir(
        s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint, version=current
    )
    assert (Path(model_dir) / "model-00002-of-00002.safetensors").read_bytes() == new


def test_the_cache_directory_differs_per_endpoint_and_per_version() -> None:
    """One bucket name on two S3 services, or one prefix at two content versions, are two models: a copy of
    one must never be served for the other."""
    uri = "s3://models/m"
    paths = {
        cache_path(uri, cache_dir="/c", endpoint_url=endpoint, version=version)
        for endpoint in (None, "http://a:9000", "http://b:9000")
        for version in (None, "v1", "v2")
    }
    assert len(paths) == 9


@pytest.mark.s3
def test_a_copy_without_its_marker_is_fetched_again(s3_model, s3_fault_proxy, tmp_path: Path) -> None:
    """Only the completion marker makes a copy complete: a directory in its place without one (copied by hand,
    or left by an older version) is replaced by a full download, never served as it is."""
    options = {"cache_dir": str(tmp_path), "endpoint_url": s3_fault_proxy.endpoint}
    model_dir = Path(resolve_model_dir(s3_model, **options))
    (model_dir / MARKER).unlink()
    (model_dir / "tokenizer.json").unlink()
    s3_fault_proxy.reset_counts()
    assert resolve_model_dir(s3_model, **options) == str(model_dir)
    assert_is_the_model(str(model_dir))
    assert object_gets(s3_fault_proxy) == len(MODEL)


@pytest.mark.s3
def test_folder_placeholder_keys_are_not_files(s3_model, s3_bucket, s3_env, tmp_path: Path) -> None:
    """A zero-byte 'extra/' key (a "folder" some S3 tools create) next to extra/notes.md is no file of the
    model: downloaded as one, it would clash with the folder of the same name."""
    s3_bucket.put(f"{PREFIX}/extra/", b"")
    assert_is_the_model(resolve_model_dir(s3_model, cache_dir=str(tmp_path), endpoint_url=s3_env.endpoint))


@pytest.mark.s3
def test_the_api_and_the_workers_load_an_s3_model_from_its_endpoint_cache_and_version(
    s3_bucket, s3_env, tmp_path: Path, monkeypatch
) -> None:
    """LLM(endpoint_url=) and a worker's GenerationSpec (cache_dir, model_version) reach the download: a dropped
    version would serve a run the copy of another model version, a dropped endpoint ask AWS for the bucket."""
    from pipeline import LLM
    from pipeline.generation import GenerationSpec, Generator
    from pipeline.models.loader import ASSETS
    from pipeline.runner.identity import s3_model_identity, s3_objects

    for file in (ASSETS / "tiny-diffusiongemma").iterdir():
        s3_bucket.put(f"tiny/{file.name}", file.read_bytes())
    uri, endpoint = f"{s3_bucket.uri}/tiny", s3_env.endpoint
    monkeypatch.setenv("CANVASFLOW_CACHE", str(tmp_path / "home"))
    llm = LLM(uri, endpoint_url=endpoint, max_new_tokens=16, max_denoising_steps=2)
    default = cache_path(uri, cache_dir=str(tmp_path / "home" / "models"), endpoint_url=endpoint)
    assert llm.generator.loaded.info.model_dir == str(default)
    version = s3_model_identity(uri, s3_objects(S3Store(uri, S3Options(endpoint_url=endpoint))))
    spec = GenerationSpec(uri, endpoint_url=endpoint, cache_dir=str(tmp_path / "c"), model_version=version)
    expected = cache_path(uri, cache_dir=str(tmp_path / "c"), endpoint_url=endpoint, version=version)
    assert Generator(spec).loaded.info.model_dir == str(expected)


def test_an_empty_canvasflow_cache_variable_counts_as_unset(monkeypatch) -> None:
    """CANVASFLOW_CACHE= (set, empty) keeps the default cache, not the current directory."""
    from pipeline.models.loader import default_cache_dir

    monkeypatch.setenv("CANVASFLOW_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "canvasflow"
    monkeypatch.setenv("CANVASFLOW_CACHE", "/data/cf")
    assert default_cache_dir() == Path("/data/cf")
