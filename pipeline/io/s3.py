"""The S3 (-compatible) backend of `pipeline.io.store.Store`, and the one retry layer of every S3 call.

boto3's standard credential chain (environment, profile, instance role); botocore's own retries are off and
`call_with_retries` retries throttling, 5xx, dropped and refused connections with jittered backoff, logging
each retry. Errors end as StoreError naming the location and, for the usual mistakes, what to fix; credentials
never appear in logs or messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.io.store import (
    CHUNK,
    PROBE_PREFIX,
    PROBE_STALE_S,
    S3Options,
    Store,
    StoreError,
    env_endpoint,
    split_s3_uri,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
POOL_CONNECTIONS = 32  # HTTP connections a client keeps (threads calling it at once)


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

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of the object from `offset` (one ranged GET; fewer where the object ends first)."""
        if length <= 0:
            return b""

        def get() -> bytes:
            span = f"bytes={offset}-{offset + length - 1}"
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=span)["Body"].read()

        return self._call(f"read {self.describe(key)} (bytes {offset} to {offset + length})", get)

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
        probe = f"{PROBE_PREFIX}{os.getpid()}-{random.randrange(1 << 30)}"
        where = f" (endpoint {self.options.endpoint_url})" if self.options.endpoint_url else ""
        if not where and (variable := env_endpoint()) is not None:
            from pipeline.config.validate import without_userinfo

            where = f" (endpoint {without_userinfo(os.environ[variable])}, from {variable})"
        try:
            self.write_bytes(probe, b"ok")
            self.delete([probe])
        except StoreError as e:
            raise StoreError(
                f"output location {self.uri}{where} is not writable: {e}. Check that bucket '{self.bucket}' "
                "exists, output.endpoint_url and the credentials in the environment / AWS configuration."
            ) from None
        # Probes of processes killed between their write and delete: nothing else lists or removes them.
        with contextlib.suppress(StoreError):  # best effort (e.g. credentials that may not list)
            old = [key for key in self.list(PROBE_PREFIX) if (self.age_s(key) or 0.0) > PROBE_STALE_S]
            self.delete(old)

    def child(self, prefix: str) -> S3Store:
        return S3Store(f"{self.uri}/{prefix.strip('/')}", self.options)


def make_s3_client(options: S3Options):
    import boto3
    from botocore.config import Config

    config = Config(
        # One HTTP attempt per botocore call: call_with_retries owns the policy (backoff, logging, counts).
        retries={"total_max_attempts": 1, "mode": "standard"},
        # One connection per thread that shares the client (RunStore.committed reads 16 markers at a time): with
        # botocore's default of 10, connections were dropped and opened again.
        max_pool_connections=POOL_CONNECTIONS,
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


# Answers that last until someone acts: a retried shard would be refused again (StoreError.refused).
REFUSED_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "NoCredentialsError",
        "QuotaExceeded",
    }
)


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
                from pipeline.config.validate import without_userinfo

                code = _error_code(e)
                # botocore names the endpoint, which AWS_ENDPOINT_URL may give as http://KEY:SECRET@host
                detail = without_userinfo(f"{code}: {e}" if code else str(e))
                hint = _HINTS.get(code) or _HINTS.get(type(e).__name__)
                raise StoreError(
                    f"cannot {what} (after {attempt} attempt(s)): {detail}" + (f" ({hint})" if hint else ""),
                    refused=(code or type(e).__name__) in REFUSED_CODES,
                ) from e
            pause = delay * (0.5 + random.random())
            reason = _error_code(e) or type(e).__name__
            logger.warning("S3: %s failed (%s); retry %d/%d in %.2fs", what, reason, attempt,
                           options.max_attempts - 1, pause)  # fmt: skip
            time.sleep(pause)
            delay = min(delay * 2, options.max_delay_s)
    raise StoreError(f"cannot {what}: S3Options.max_attempts={options.max_attempts} must be at least 1")
