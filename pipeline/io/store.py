"""Object storage behind one small interface: a local directory or an S3 (-compatible) prefix.

Keys are '/'-separated and relative to the root; `list(prefix)` matches by string prefix on both backends, as
S3 does. `write_bytes` is atomic (local: temporary file, fsync, rename; S3: one PUT); the temporary file of a
write killed before its rename is never listed, and `remove_temp_files` deletes old ones. S3 calls use boto3's
standard credential chain and one retry layer (pipeline/io/s3.py). Credentials never appear in logs or
messages.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # local temporary files; never listed (remove_temp_files deletes those left behind)
CHUNK = 8 << 20  # streaming copies: bytes per read
# check_writable's probe object; one this old is a leftover of a process killed between writing and deleting it
PROBE_PREFIX = ".canvasflow-probe-"
PROBE_STALE_S = 60.0


class StoreError(RuntimeError):
    """A storage operation failed; the message names the location (never the credentials).

    `refused`: the location refuses the operation for a reason that retrying does not fix (a full disk or
    quota, a read-only file system, no permission, a file where a folder should be; on S3 a missing bucket,
    denied access, credentials not accepted). A job then starts no more shards (pipeline/runner/pool.py): each
    would be generated in full only to fail at its commit."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        # Kept through pickling (the instance's __dict__): a worker's error reaches the driver with it.
        self.refused = refused


# OS errors of a local store that last until someone acts (frees space, remounts, fixes permissions or paths).
REFUSED_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
)


def _refused(error: OSError) -> bool:
    return error.errno in REFUSED_ERRNOS


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8  # HTTP attempts per call (botocore's own retries are off)
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


# Where boto3 takes an S3 endpoint from when it is given none (output.endpoint_url unset), first found first.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def env_endpoint() -> str | None:
    """The environment variable that gives boto3 its S3 endpoint when output.endpoint_url is unset, or None
    (requests go to AWS). For messages: a job on MinIO configured only by the environment is not on AWS."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return next((name for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)


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

    def remove_temp_files(
        self, older_than_s: float, targets: Collection[str] | None = None
    ) -> tuple[int, int]:
        """Deletes the temporary files of writes that never finished (a process killed between writing and
        renaming one) untouched for more than `older_than_s`, with `targets` only those of writes of these keys
        at the root; returns their count and bytes. Only a local store has them: an S3 write is one PUT, so
        here there is nothing to do."""
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
            raise StoreError(f"cannot write {path}: {e.strerror or e}{why}", refused=_refused(e)) from e

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
            raise StoreError(f"cannot write {path}: {e.strerror or e}", refused=_refused(e)) from e

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
                raise StoreError(f"cannot delete {path}: {e.strerror or e}", refused=_refused(e)) from e

    def remove_temp_files(
        self, older_than_s: float, targets: Collection[str] | None = None
    ) -> tuple[int, int]:
        """See Store.remove_temp_files: `.tmp-*` files anywhere below the root, aged by modification time (a
        write in flight keeps it recent). Best effort: one that cannot be deleted is logged and skipped (it is
        never listed or read)."""
        cutoff = time.time() - older_than_s
        count = size = 0
        for dirpath, dirs, files in os.walk(self.root):
            if targets is not None:
                dirs.clear()  # their keys are at the root: the walk stops there
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                if targets is not None and name[len(TMP_PREFIX) :].rsplit(".", 1)[0] not in targets:
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
        probe = f"{PROBE_PREFIX}{os.getpid()}-{random.randrange(1 << 30)}"
        try:
            if not create:
                raise StoreError(f"{folder} is not a writable directory")
            self.write_bytes(probe, b"ok")
            self.delete([probe])
            self._remove_old_probes()
        except StoreError as e:
            file = _file_in_the_way(self.root)
            fix = (
                f"{file} is a file, not a directory: give output.uri a directory (created if missing)"
                if file is not None
                else "check output.uri and the permissions of that directory"
            )
            raise StoreError(f"output location {self.uri} is not writable ({e}): {fix}") from None

    def _remove_old_probes(self) -> None:
        """Deletes the probes (and their temporary files) that processes killed in check_writable left at the
        root, which nothing else lists or removes. Best effort."""
        cutoff = time.time() - PROBE_STALE_S
        with contextlib.suppress(OSError), os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith((PROBE_PREFIX, TMP_PREFIX + PROBE_PREFIX)):
                    continue
                with contextlib.suppress(OSError):
                    if (
                        entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff
                    ):
                        os.unlink(entry.path)

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


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """The store at `uri`: an s3:// prefix (pipeline/io/s3.py) or a local directory."""
    if is_s3(uri):
        from pipeline.io.s3 import S3Store

        return S3Store(uri, S3Options(endpoint_url=endpoint_url, region=region))
    return LocalStore(uri)
