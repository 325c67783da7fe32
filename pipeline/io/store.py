"""Object storage behind one small interface: a local directory or an S3 (-compatible) prefix.

Keys are '/'-separated paths relative to the store's root. `write_bytes` is atomic: a reader sees the whole
object or nothing (local: write to a temporary file, fsync, rename; S3: a single PUT). S3 calls go through
boto3 with the standard credential chain (environment, profile, instance role) and are retried with
exponential backoff on throttling, 5xx answers and dropped or refused connections. Credentials are never
logged or stored; `describe()` shows only the location.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """A storage operation failed; the message names the location (never the credentials)."""


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8  # per call, botocore's own retries included
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0


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
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursive), relative to the root, sorted."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Deletes the keys that exist; missing keys are fine."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raises StoreError naming the location if objects cannot be written and deleted there."""

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
        self.root = Path(root).expanduser().absolute()
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
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def check_writable(self) -> None:
        probe = f".canvasflow-probe-{os.getpid()}-{random.randrange(1 << 30)}"
        self.write_bytes(probe, b"ok")
        self.delete([probe])

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))


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
        return f"{self.prefix}/{key}".lstrip("/") if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retries(what, fn, self.options)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"write {self.describe(key)}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data))

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(f"read {self.describe(key)}", get)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(f"check {self.describe(key)}", head)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = f"{self.prefix}/" if self.prefix else ""

        def page_all() -> list[str]:
            keys: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    keys.append(item["Key"][len(strip) :])
            return keys

        return sorted(self._call(f"list {self.describe(prefix)}", page_all))

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            if chunk:
                self._call(
                    f"delete under {self.uri}",
                    lambda chunk=chunk: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk}),
                )

    def check_writable(self) -> None:
        probe = f".canvasflow-probe-{os.getpid()}-{random.randrange(1 << 30)}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete([probe])
        except StoreError as e:
            raise StoreError(
                f"output location {self.uri} is not writable: {e}. Check that bucket '{self.bucket}' exists, "
                "output.endpoint_url and the credentials in the environment / AWS configuration."
            ) from None

    def child(self, prefix: str) -> S3Store:
        return S3Store(f"{self.uri}/{prefix.strip('/')}", self.options)


def make_s3_client(options: S3Options):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
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
}


def is_retryable(error: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(error, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)):
        return True
    if isinstance(error, ClientError):
        status = (getattr(error, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(error) in RETRYABLE_CODES or status >= 500 or status == 429
    return isinstance(error, (ConnectionError, TimeoutError))


def call_with_retries(what: str, fn: Callable[[], T], options: S3Options) -> T:
    """Runs `fn`, retrying transient S3 failures with jittered exponential backoff."""
    delay = options.base_delay_s
    for attempt in range(1, options.max_attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_retryable(e) or attempt == options.max_attempts:
                code = _error_code(e)
                detail = f"{code}: {e}" if code else str(e)
                raise StoreError(f"cannot {what} (after {attempt} attempt(s)): {detail}") from e
            logger.warning("S3: %s failed (%s); retry %d/%d in %.1fs", what, type(e).__name__, attempt,
                           options.max_attempts - 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, options.max_delay_s)
    raise AssertionError("unreachable")


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Store:
    if is_s3(uri):
        return S3Store(uri, S3Options(endpoint_url=endpoint_url, region=region))
    return LocalStore(uri)


def read_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """Bytes of one input object: a local file or s3://bucket/key."""
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        return S3Store(f"s3://{bucket}", S3Options(endpoint_url=endpoint_url, region=region)).read_bytes(key)
    try:
        return Path(uri).expanduser().read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read {uri}: {e.strerror or e}") from e
