"""Model directories on s3:// downloaded once per node into a local cache; local directories pass through.

One process per node (fcntl lock) downloads into a temporary sibling, checks every size, writes a completion
marker and renames the directory into place; the others wait and reuse it. A completed copy is reused without
any S3 call; an interrupted download never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, StoreError, fsync_dir, is_s3, split_s3_uri
from pipeline.models.loader import ModelError, default_cache_dir

logger = logging.getLogger(__name__)

MARKER = ".canvasflow-complete.json"  # written last into the temporary directory, before the rename
PARTIAL = ".partial-"  # <name>.partial-XXXX: a download in progress, or left by a killed one
DOWNLOAD_THREADS = 4  # objects (weight shards) download in parallel: one stream rarely fills the link
PROGRESS_S = 30.0  # a download longer than this logs how far it got every PROGRESS_S seconds


def resolve_model_dir(
    path: str,
    *,
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    version: str | None = None,
) -> str:
    """A local directory with the model at `path`: a local directory as is, or s3://bucket/prefix copied to
    `<cache_dir>/<bucket>/<prefix>-<hash>/` (cache_dir defaults to ~/.cache/canvasflow/models, or
    $CANVASFLOW_CACHE/models; the hash covers endpoint, URI and `version`).

    Reuse checks only the local copy against its marker (files present, sizes equal), never S3, so actors start
    without S3 calls and even while S3 is unreachable. `version` names the content: the job passes the model
    identity its driver computed from the prefix's listing (sizes and ETags), so a prefix whose objects were
    replaced is fetched again into a new directory rather than served from the old copy. Without a version
    the prefix is treated as immutable (publish a new version under a new prefix, or delete the cache
    directory to fetch again). A killed download leaves
    a `<name>.partial-*` sibling that the next caller removes. The cache must be on a node-local disk (flock
    over NFS is not reliable). Raises ModelError naming the path (and endpoint) when it cannot be had.
    """
    if not is_s3(path):
        return _check_local(path)
    uri = "s3://{}/{}".format(*split_s3_uri(path)).rstrip("/")
    target = cache_path(uri, cache_dir=cache_dir, endpoint_url=endpoint_url, version=version)
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock"), uri):
        if _is_complete(target):  # another process finished it while we waited for the lock
            return str(target)
        _remove_leftovers(target)
        store = S3Store(uri, S3Options(endpoint_url=endpoint_url, region=region))
        try:
            _download(store, target, version)
        except StoreError as e:
            where = f" (endpoint {endpoint_url})" if endpoint_url else ""
            raise ModelError(f"model.path={path!r}{where} cannot be downloaded: {e}") from e
    return str(target)


def cache_path(
    uri: str, *, cache_dir: str | None = None, endpoint_url: str | None = None, version: str | None = None
) -> Path:
    """`<cache_dir>/<bucket>/<prefix>-<hash of endpoint, uri and version>`: readable, and distinct per
    source and content version."""
    bucket, prefix = split_s3_uri(uri)
    parts = prefix.split("/") if prefix else []
    if any(part in ("", ".", "..") for part in parts):
        raise ModelError(f"model.path={uri!r}: the prefix must not contain empty, '.' or '..' segments")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "models"
    source = f"{endpoint_url or ''}\n{uri}" + (f"\n{version}" if version else "")
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return root.absolute() / bucket / f"{prefix or '_bucket_root'}-{digest}"


def _check_local(path: str) -> str:
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ModelError(
            f"model.path={path!r} is not a directory; give a Hugging Face model directory or an s3:// URI"
        )
    if not (local / "config.json").is_file():
        raise ModelError(f"model.path={path!r} has no config.json; is it a Hugging Face model directory?")
    return str(local)


def _is_complete(target: Path) -> bool:
    """The marker is there and every file it lists has its size (a cheap local check, no S3)."""
    try:
        files = json.loads((target / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for key, size in files.items():
        try:
            actual = (target / key).stat().st_size
        except OSError:
            actual = None
        if actual != size:
            logger.warning("model cache %s is damaged (%s: %s bytes, expected %s); fetching again",
                           target, key, actual, size)  # fmt: skip
            return False
    return True


@contextlib.contextmanager
def _locked(lock_path: Path, uri: str) -> Iterator[None]:
    """An exclusive flock on `lock_path` (released by the kernel if the holder dies)."""
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process on this node to download %s", uri)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock file stays: deleting it would let a third process lock a different inode


def _remove_leftovers(target: Path) -> None:
    """Under the lock: temporary directories of killed downloads, and a damaged or incomplete copy."""
    stale = [p for p in target.parent.iterdir() if p.name.startswith(target.name + PARTIAL)]
    if target.exists():
        stale.append(target)
    for path in stale:
        logger.warning("removing incomplete model download %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _download(store: S3Store, target: Path, version: str | None) -> None:
    """Copies every object under the prefix into `target`. With `version` (the identity the driver computed from
    its listing: sizes and ETags), objects replaced since are refused rather than cached under that version: a
    worker started later (a replacement, a resume) would load another model than the run's."""
    from pipeline.runner.identity import s3_model_identity, s3_objects

    # Zero-byte keys ending in '/' are "folder" placeholders some tools create; they are not files.
    objects = {k: v for k, v in s3_objects(store).items() if not k.endswith("/")}
    if version is not None and objects and s3_model_identity(store.uri, objects) != version:
        raise ModelError(
            f"model.path={store.uri!r}: its objects changed since the run started (new or replaced files: "
            "their sizes or ETags differ), so this worker would load another model than the run's. Put the "
            "published files back, or start a new run (a new run.id) with the new model"
        )
    sizes = {k: v["size"] for k, v in objects.items()}
    if not sizes:
        raise ModelError(
            f"model.path={store.uri!r}: no objects under this prefix; check the bucket and prefix"
        )
    if "config.json" not in sizes:
        raise ModelError(
            f"model.path={store.uri!r} has no config.json; is it a Hugging Face model directory?"
        )
    for key in sizes:
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ModelError(f"model.path={store.uri!r}: object key {key!r} cannot be a local file name")
    total = sum(sizes.values())
    logger.info("downloading %s (%d files, %.1f MB) to %s", store.uri, len(sizes), total / 1e6, target)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=target.name + PARTIAL, dir=target.parent))
    try:
        for key in sizes:
            (tmp / key).parent.mkdir(parents=True, exist_ok=True)
        store.client  # noqa: B018 - build the boto3 client once, before the threads share it
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, len(sizes))) as pool:
            futures = [
                pool.submit(store.download_file, key, tmp / key, objects[key]["etag"] or None)
                for key in sizes
            ]
            try:
                _wait_logging_progress(futures, store.uri, tmp, sizes, started)
            except BaseException:
                for future in futures:
                    future.cancel()  # files not started yet; the running ones end with their object
                raise
        for key, size in sizes.items():
            got = (tmp / key).stat().st_size
            if got != size:
                raise StoreError(f"{store.describe(key)}: got {got} bytes, the listing says {size}")
        marker = {"uri": store.uri, "endpoint_url": store.options.endpoint_url, "files": sizes,
                  "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for folder in {(tmp / key).parent for key in sizes}:
            fsync_dir(folder)
        os.rename(tmp, target)  # atomic: the directory appears complete or not at all
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.monotonic() - started
    logger.info("downloaded %s in %.1fs (%.1f MB/s)", store.uri, elapsed, total / 1e6 / max(elapsed, 1e-6))


def _wait_logging_progress(
    futures: list, uri: str, folder: Path, sizes: dict[str, int], started: float
) -> None:
    """Waits for every download (raising the first failure) and logs the bytes on disk every PROGRESS_S
    seconds: a 50 GB checkpoint takes minutes, which a log that said nothing would look like a hang."""
    total, pending, logged = sum(sizes.values()), set(futures), time.monotonic()
    while pending:
        done, pending = wait(pending, timeout=PROGRESS_S, return_when=FIRST_COMPLETED)
        for future in done:
            future.result()
        if pending and time.monotonic() - logged >= PROGRESS_S:
            logged = time.monotonic()
            got = sum(_size(folder / key) for key in sizes)
            logger.info(
                "downloading %s: %.1f of %.1f MB (%.0f%%, %.1f MB/s)",
                uri,
                got / 1e6,
                total / 1e6,
                100 * got / max(total, 1),
                got / 1e6 / max(logged - started, 1e-6),
            )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # not started yet
        return 0
