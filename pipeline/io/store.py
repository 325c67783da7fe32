"""Object storage behind one small interface: a local directory or an S3 (-compatible) prefix.

Keys are '/'-separated and relative to the root; `list(prefix)` matches by string prefix on both backends, as
S3 does. `write_bytes` is atomic (local: temporary file, fsync, rename; S3: one PUT); the temporary file of a
write killed before its rename is never listed, and `remove_temp_files` deletes old ones. S3 calls use boto3's
standard credential chain and `call_with_retries`, the only retry layer (botocore's own is off): throttling,
5xx, dropped and refused connections, with jittered backoff. Credentials never appear in logs or messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

TMP_PREFIX = ".tmp-"  # local temporary files; never listed (remove_temp_files deletes those left behind)
CHUNK = 8 << 20  # streaming copies: bytes per read


class StoreError(RuntimeError):
    """A storage operation failed; the message names the location (never the credentials)."""


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8  # HTTP attempts per call (botocore's own retries are off)
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket: use s3://bucket/prefix")
    return bucket, key.strip("/")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


class Store(ABC):
    """A root location holding objects addressed by relative keys."""

    uri: str

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def write_if_absent(self, key: str, data: bytes) -> bool:
        """Writes the object only if no object has that key (atomically: of concurrent writers exactly one
        wins); True if this call created it, False if it existed."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (recursive), relative to the root, sorted."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Deletes the keys that exist; missing keys are fine."""

    @abstractmethod
    def check_writable(self, *, create: bool = True) -> None:
        """Raises StoreError naming the location if objects cannot be written and deleted there. `create=False`
        (a dry run) leaves nothing behind, not even the folders a local location would be created with."""

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Like `list`, with each object's size in bytes."""
        raise NotImplementedError

    def folders(self) -> list[str]:
        """Names of the folders directly under the root (key prefixes up to a '/'), sorted; one level only, so
        that a location holding many runs of many parts is not listed whole."""
        raise NotImplementedError

    def download_file(self, key: str, dest: str | os.PathLike[str]) -> int:
        """Copies one object to the local file `dest`, streaming (never whole in memory); returns its size."""
        data = self.read_bytes(key)
        Path(dest).write_bytes(data)
        return len(data)

    def remove_temp_files(self, older_than_s: float) -> tuple[int, int]:
        """Deletes the temporary files of writes that never finished (a process killed between writing and
        renaming one) untouched for more than `older_than_s`; returns their count and bytes. Only a local store
        has them: an S3 write is one PUT, so here there is nothing to do."""
        return 0, 0

    def age_s(self, key: str) -> float | None:
        """Seconds since the object was last written, by the store's own clock (so that hosts whose clocks
        disagree judge a lock's heartbeat alike); None when it does not exist or the store cannot tell. A
        local store compares the file's mtime with this host's clock: on a filesystem shared between hosts
        (NFS) the mtime is the server's, and the hosts' clocks must agree."""
        return None

    def describe(self, key: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        self.delete(keys)
        return len(keys)

    def child(self, prefix: str) -> Store:
        """A store rooted at `<root>/<prefix>`."""
        raise NotImplementedError


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        # Resolved, so that keys (resolved in `_path`) compare right under a symlinked root (/tmp on macOS).
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _write_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)  # the rename itself survives a crash of the machine
        except OSError as e:
            file = _file_in_the_way(path.parent)
            why = f" ({file} is a file, not a directory)" if file is not None else ""
            raise StoreError(f"cannot write {path}: {e.strerror or e}{why}") from e

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        if prefix.endswith("/"):  # a folder (a run): its now-empty directories go too, as they do on S3
            self.remove_empty_folders(prefix.rstrip("/"), keep_top=False)
        return count

    def remove_empty_folders(self, prefix: str = "", *, keep_top: bool = True) -> None:
        """Removes the empty directories under `prefix` (and it too unless `keep_top`), as S3 has no folder
        that holds no object."""
        top = self._path(prefix)
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            if keep_top and Path(dirpath) == top:
                continue
            with contextlib.suppress(OSError):  # not empty (e.g. a leftover temporary file) or gone
                os.rmdir(dirpath)

    def write_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _write_temp(path, data)
            try:
                os.link(tmp, path)  # atomic, whole content, and fails if `path` exists: first writer wins
                created = True
            except FileExistsError:
                created = False
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
            return created
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from e

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"{path} does not exist") from e
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def age_s(self, key: str) -> float | None:
        try:
            return max(0.0, time.time() - self._path(key).stat().st_mtime)
        except OSError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._walk(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: (self.root / key).stat().st_size for key in self.list(prefix)}

    def folders(self) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot list {self.root}: {e.strerror or e}") from e

    def _walk(self, prefix: str) -> list[str]:
        folder, _, _ = prefix.rpartition("/")  # only this folder can hold keys starting with `prefix`
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return keys

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise StoreError(f"cannot delete {path}: {e.strerror or e}") from e

    def remove_temp_files(self, older_than_s: float) -> tuple[int, int]:
        """See Store.remove_temp_files: `.tmp-*` files anywhere below the root, aged by modification time (a
        write in flight keeps it recent). Best effort: one that cannot be deleted is logged and skipped (it is
        never listed or read)."""
        cutoff = time.time() - older_than_s
        count = size = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    stat = path.lstat()
                    if stat.st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
                except OSError as e:
                    logger.warning("cannot delete the temporary file %s: %s", path, e.strerror or e)
                    continue
                count += 1
                size += stat.st_size
        return count, size

    def download_file(self, key: str, dest: str | os.PathLike[str]) -> int:
        path = self._path(key)
        try:
            shutil.copyfile(path, dest)
        except OSError as e:
            raise StoreError(f"cannot copy {path} to {dest}: {e.strerror or e}") from e
        return path.stat().st_size

    def check_writable(self, *, create: bool = True) -> None:
        if not create:  # the folder, or the nearest one above it that exists, must let us create entries
            folder = next(p for p in (self.root, *self.root.parents) if p.exists())
            if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
                return
        probe = f".canvasflow-probe-{os.getpid()}-{random.randrange(1 << 30)}"
        try:
            if not create:
                raise StoreError(f"{folder} is not a writable directory")
            self.write_bytes(probe, b"ok")
            self.delete([probe])
        except StoreError as e:
            file = _file_in_the_way(self.root)
            fix = (
                f"{file} is a file, not a directory: give output.uri a directory (created if missing)"
                if file is not None
                else "check output.uri and the permissions of that directory"
            )
            raise StoreError(f"output location {self.uri} is not writable ({e}): {fix}") from None

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))


def _file_in_the_way(folder: Path) -> Path | None:
    """`folder`, or a folder above it, that is a file: writing under it fails with "File exists" or "Not a
    directory", which does not say which path is wrong."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _write_temp(path: Path, data: bytes) -> Path:
    """A fsynced temporary file next to `path` holding `data`. Created like `open(..., "wb")` creates a file
    (mode 0o666 minus the process umask, applied by the kernel), not 0o600 as `tempfile.mkstemp` would:
    the renamed object keeps the temporary file's mode."""
    for _ in range(100):
        tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes a rename or a new file in the directory `path` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows); the data itself was fsynced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Store(Store):
    def __init__(self, uri: str, options: S3Options | None = None) -> None:
        self.bucket, self.prefix = split_s3_uri(uri)
        self.options = options or S3Options()
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = None

    # boto3 clients are not picklable: build lazily in each process.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client(self.options)
        return self._client

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retries(what, fn, self.options)

    def write_bytes(self, key: str, data: bytes) -> None:
        def put() -> None:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

        self._call(f"write {self.describe(key)}", put)

    def write_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        if self.exists(key):  # the common case, and the only guard on stores that ignore If-None-Match
            return False

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if _error_code(e) in ("PreconditionFailed", "412"):
                    return False  # another writer created it first
                raise  # a 409 ConditionalRequestConflict (a concurrent write in flight) is retried with backoff

        return self._call(f"write {self.describe(key)} (if absent)", put)

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(f"read {self.describe(key)}", get)

    def download_file(self, key: str, dest: str | os.PathLike[str], etag: str | None = None) -> int:
        """Streams the object into `dest` (fsynced); a retried attempt starts the file over. With `etag`, only
        that version of the object (412 PreconditionFailed when it was replaced since it was listed)."""
        condition = {"IfMatch": f'"{etag}"'} if etag else {}

        def get() -> int:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **condition)["Body"]
            size = 0
            with open(dest, "wb") as f:
                # iter_chunks raises IncompleteReadError if the connection ends before Content-Length bytes.
                for chunk in body.iter_chunks(CHUNK):
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            return size

        return self._call(f"download {self.describe(key)} to {dest}", get)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                    return False  # note: a missing bucket also answers 404 to HEAD
                raise

        return self._call(f"check {self.describe(key)}", head)

    def age_s(self, key: str) -> float | None:
        """The response's Date minus the object's Last-Modified: both the server's clock (1 s resolution)."""
        from email.utils import parsedate_to_datetime

        from botocore.exceptions import ClientError

        def head() -> float | None:
            try:
                response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            modified = response.get("LastModified")
            if not date or modified is None:
                return None
            try:
                now = parsedate_to_datetime(date)
            except (TypeError, ValueError):
                return None
            if now.tzinfo is None or modified.tzinfo is None:  # a Date without a zone: cannot compare
                return None
            return max(0.0, (now - modified).total_seconds())

        return self._call(f"check {self.describe(key)}", head)

    def list(self, prefix: str = "") -> list[str]:
        return list(self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        full = self._key(prefix)
        strip = len(f"{self.prefix}/") if self.prefix else 0

        def page_all() -> dict[str, int]:
            sizes: dict[str, int] = {}
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    sizes[item["Key"][strip:]] = int(item["Size"])
            return sizes

        # The whole listing is one retried unit: a failure on page 7 starts over (pages are not resumable
        # across a dropped connection without trusting a continuation token from the failed attempt).
        return dict(sorted(self._call(f"list {self.describe(prefix)}", page_all).items()))

    def folders(self) -> list[str]:
        full = f"{self.prefix}/" if self.prefix else ""

        def page_all() -> list[str]:
            names = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                names += [p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return names

        return sorted(self._call(f"list the folders of {self.uri}", page_all))

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import ClientError

        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            pending = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            if not pending:
                continue
            errors: list[dict] = []

            def delete_chunk(pending: list[dict[str, str]] = pending, errors: list[dict] = errors) -> None:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": pending, "Quiet": True}
                )
                # Per-key failures come back in a 200 answer: the transient ones (InternalError, SlowDown under
                # load) are retried like a failed call, for those keys only.
                failed = response.get("Errors", [])
                transient = [e for e in failed if e.get("Code") in RETRYABLE_CODES]
                errors.extend(e for e in failed if e.get("Code") not in RETRYABLE_CODES)
                if transient:
                    pending[:] = [{"Key": e["Key"]} for e in transient]
                    first = transient[0]
                    raise ClientError(
                        {
                            "Error": {
                                "Code": first["Code"],
                                "Message": f"{len(transient)} key(s), e.g. {first['Key']}",
                            }
                        },
                        "DeleteObjects",
                    )

            self._call(f"delete under {self.uri}", delete_chunk)
            if errors:
                first = errors[0]
                raise StoreError(
                    f"cannot delete {len(errors)} object(s) under {self.uri}, e.g. "
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
                )

    def check_writable(self, *, create: bool = True) -> None:  # an S3 probe object leaves nothing behind
        probe = f".canvasflow-probe-{os.getpid()}-{random.randrange(1 << 30)}"
        where = f" (endpoint {self.options.endpoint_url})" if self.options.endpoint_url else ""
        try:
            self.write_bytes(probe, b"ok")
            self.delete([probe])
        except StoreError as e:
            raise StoreError(
                f"output location {self.uri}{where} is not writable: {e}. Check that bucket '{self.bucket}' "
                "exists, output.endpoint_url and the credentials in the environment / AWS configuration."
            ) from None

    def child(self, prefix: str) -> S3Store:
        return S3Store(f"{self.uri}/{prefix.strip('/')}", self.options)


def make_s3_client(options: S3Options):
    import boto3
    from botocore.config import Config

    config = Config(
        # One HTTP attempt per botocore call: call_with_retries owns the policy (backoff, logging, counts).
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        s3={"addressing_style": "path"} if options.endpoint_url else None,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
    "ConditionalRequestConflict",  # 409 to a conditional write while another write of the key is in flight
}  # fmt: skip

_HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it or fix the bucket name",
    "InvalidAccessKeyId": "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and endpoint_url",
    "SignatureDoesNotMatch": "check the credentials (AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and endpoint_url",
    "AccessDenied": "the credentials in use may not access this location",
    "ExpiredToken": "the session credentials have expired: refresh them",
    "NoCredentialsError": "no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    "EndpointConnectionError": "is the endpoint URL right and the server up?",
}


def is_retryable(error: Exception) -> bool:
    from botocore.exceptions import (
        ChecksumError,
        ClientError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
        SSLError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(error, SSLError):  # a TLS connection cut midway is transient; a bad certificate is not
        return "CERTIFICATE_VERIFY_FAILED" not in str(error)
    # ConnectionError: refused / unreachable / connect timeout. HTTPClientError: connection closed, read
    # timeout, error while streaming a body. IncompleteReadError: body shorter than Content-Length.
    if isinstance(error, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(error, (ChecksumError, FlexibleChecksumError)):
        return True  # corrupted in transit
    if isinstance(error, ClientError):
        status = (getattr(error, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(error) in RETRYABLE_CODES or status >= 500 or status in (408, 429)
    return isinstance(error, (ConnectionError, TimeoutError))  # the builtins (OSError), e.g. a reset


def call_with_retries(what: str, fn: Callable[[], T], options: S3Options) -> T:
    """Runs `fn`, retrying transient S3 failures with jittered exponential backoff, at most
    `options.max_attempts` times. botocore and OS errors end as StoreError naming `what`; other exceptions
    (bugs) propagate unchanged."""
    from botocore.exceptions import BotoCoreError, ClientError

    delay = options.base_delay_s
    for attempt in range(1, options.max_attempts + 1):
        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as e:
            if not is_retryable(e) or attempt >= options.max_attempts:
                code = _error_code(e)
                detail = f"{code}: {e}" if code else str(e)
                hint = _HINTS.get(code) or _HINTS.get(type(e).__name__)
                raise StoreError(
                    f"cannot {what} (after {attempt} attempt(s)): {detail}" + (f" ({hint})" if hint else "")
                ) from e
            pause = delay * (0.5 + random.random())
            reason = _error_code(e) or type(e).__name__
            logger.warning("S3: %s failed (%s); retry %d/%d in %.2fs", what, reason, attempt,
                           options.max_attempts - 1, pause)  # fmt: skip
            time.sleep(pause)
            delay = min(delay * 2, options.max_delay_s)
    raise StoreError(f"cannot {what}: S3Options.max_attempts={options.max_attempts} must be at least 1")


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Store:
    if is_s3(uri):
        return S3Store(uri, S3Options(endpoint_url=endpoint_url, region=region))
    return LocalStore(uri)
