"""Which files an input location holds (a file, a local folder, an S3 prefix) and which format they are in;
the files a folder holds that are no data file are named in a warning, never dropped without a word. And a
local copy of one such file for the readers (an S3 object downloaded to a temporary folder)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.config.validate import without_userinfo
from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, StoreError, env_endpoint, is_s3, open_store, split_s3_uri

logger = logging.getLogger(__name__)

# gzip is the one codec the reader decompresses (.gz under any JSON Lines name); other files in a folder are
# skipped with a warning naming them.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SKIPPED_NAMED = 5  # skipped files of a folder named in the warning; the rest are counted
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


class InputError(ValueError):
    """The input as a whole is unusable; the message names the file or column."""


def s3_input_note(endpoint_url: str | None) -> str:
    """Added to an error reading an s3:// input: the endpoint comes from output.endpoint_url, the only setting
    of it, which the input uses too (an input on MinIO or SeaweedFS read without it went to AWS), or where
    that is unset from boto3's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    if endpoint_url:
        return f" (the input is read through output.endpoint_url={endpoint_url}, as the output is)"
    if (variable := env_endpoint()) is not None:
        return (
            f" (the input is read through the endpoint in {variable}={without_userinfo(os.environ[variable])}, "
            "as no output.endpoint_url is set)"
        )
    return (
        " (the input is read from AWS S3, as no output.endpoint_url is set: for another S3-compatible store "
        "(MinIO, SeaweedFS, R2, ...) set output.endpoint_url=<its URL>, which the input uses too)"
    )


def detect_format(path: str, requested: str, files: list[str]) -> str:
    if requested != "auto":
        return requested
    if path.startswith("hf:"):
        return "hf"
    if is_s3(path):
        root = path.rstrip("/")
        if any(f"{root}/{marker}" in files for marker in HF_DISK_MARKERS):
            return "hf_disk"
    elif Path(path).is_dir() and any((Path(path) / marker).exists() for marker in HF_DISK_MARKERS):
        return "hf_disk"
    suffixes = {_suffix(f) for f in files}
    if None in suffixes:  # only a single file is listed without a known suffix
        raise InputError(
            f"data.path={path!r}: cannot tell the format from the file name (known: {_known_suffixes()}); "
            "set data.format to jsonl, parquet, hf_disk or hf"
        )
    if suffixes and suffixes <= {"jsonl"}:
        return "jsonl"
    if suffixes and suffixes <= {"parquet"}:
        return "parquet"
    raise InputError(
        f"data.path={path!r}: cannot tell the format from {sorted(suffixes) or 'no data files'}; "
        "set data.format to jsonl, parquet, hf_disk or hf"
    )


def _hidden(relative: str) -> bool:
    """A path below a directory input with a hidden part (`.ipynb_checkpoints/`, a macOS `._name` file): skipped,
    as pyarrow datasets and Hugging Face `datasets` skip them."""
    return any(part.startswith(".") for part in relative.split("/"))


def _marker(name: str) -> bool:
    """A file such as `_SUCCESS`: no data, and not worth a warning when a folder input holds it."""
    return name.rsplit("/", 1)[-1].startswith("_")


def _known_suffixes() -> str:
    return f"{', '.join(JSONL_SUFFIXES)}, {' or '.join(PARQUET_SUFFIXES)}"


def _suffix(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_files(path: str, *, endpoint_url: str | None, region: str | None) -> tuple[list[str], list[str]]:
    """The data files at `path` (the file itself, or the JSONL/Parquet files under a directory/prefix) and the
    other files under it, which are skipped with a warning (hidden ones are skipped silently)."""
    if path.startswith("hf:"):
        return [], []
    if is_s3(path):
        bucket, key = split_s3_uri(path)
        store = open_store(f"s3://{bucket}", endpoint_url=endpoint_url, region=region)
        try:
            keys = store.list(key)
        except StoreError as e:
            raise InputError(
                f"data.path={path!r} cannot be listed: {e}{s3_input_note(endpoint_url)}"
            ) from None
        if key in keys:
            return [path], []
        # A prefix is a folder: s3://b/in/prompts reads in/prompts/..., never in/prompts-old/ or
        # in/prompts_backup.jsonl (S3 prefixes match any key that starts with them).
        folder = f"{key}/" if key else ""
        visible = [  # folder markers (keys ending in '/', made by consoles) hold nothing
            k for k in keys if k.startswith(folder) and not k.endswith("/") and not _hidden(k[len(folder) :])
        ]
        if any(
            f"{folder}{marker}" in keys for marker in HF_DISK_MARKERS
        ):  # a dataset saved with save_to_disk
            return [f"s3://{bucket}/{k}" for k in visible], []
        files = [f"s3://{bucket}/{k}" for k in visible if _suffix(k)]
        if not files:
            siblings = sorted({k[len(key) :].split("/")[0] for k in keys if not k.startswith(folder)})
            hint = (
                f" (keys next to it start with {', '.join(repr(key + s) for s in siblings[:3])}: "
                "give the exact object or folder)"
                if siblings
                else ""
            )
            raise InputError(
                f"data.path={path!r}: no .jsonl or .parquet objects under s3://{bucket}/{folder}{hint}"
                f"{_skipped_note([k[len(folder) :] for k in visible])}"
            )
        skipped = [k[len(folder) :] for k in visible if not _suffix(k) and not _marker(k)]
        _warn_skipped(path, skipped)
        return files, skipped
    local = Path(path).expanduser()
    if local.is_file():
        return [str(local)], []
    if local.is_dir():
        if any((local / marker).exists() for marker in HF_DISK_MARKERS):  # save_to_disk: every file of it
            return _dataset_files(local), []  # (its .arrow files hold the data), as on S3 above
        files, skipped = _walk(local)
        if not files:
            raise InputError(
                f"data.path={path!r}: no {_known_suffixes()} file in this directory"
                f"{_skipped_note(skipped) or ' (it is empty)'}"
            )
        _warn_skipped(path, skipped)
        return files, skipped
    if local.is_symlink():
        raise InputError(f"data.path={path!r} is a broken symbolic link (to {os.readlink(local)})")
    raise InputError(f"data.path={path!r} does not exist")


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """The data files below a local folder, in path order, and the other files (relative paths; markers such as
    `_SUCCESS` are not counted). Symbolic links to folders outside it are followed, as users who link datasets
    into an input folder expect, each folder once; a link to a folder inside the input (read under its own path)
    or to one that holds the input (a loop) is skipped with a warning, so no row is read twice."""
    top = os.path.realpath(folder)
    roots = [top]  # the real folders read: the input and each linked folder outside it
    data: list[Path] = []
    skipped: list[str] = []
    pending = [folder]
    while pending:
        start = pending.pop(0)
        for root, dirs, names in os.walk(start):  # links are not followed here: see below
            relative_root = Path(root).relative_to(folder).as_posix()
            kept = []
            for name in sorted(d for d in dirs if not d.startswith(".")):  # hidden folders: see _hidden
                entry = os.path.join(root, name)
                if not os.path.islink(entry):
                    kept.append(name)
                    continue
                target = os.path.realpath(entry)
                holder = next((r for r in roots if _within(target, r) or _within(r, target)), None)
                if holder is None:
                    roots.append(target)
                    pending.append(Path(entry))
                elif _within(target, holder):
                    logger.warning("not following %s: it links to %s, which is read already", entry, target)
                else:
                    logger.warning(
                        "not following %s: it links to %s, which holds %s (a loop)", entry, target, holder
                    )
            dirs[:] = kept
            for name in names:
                relative = name if relative_root == "." else f"{relative_root}/{name}"
                if _hidden(relative):
                    continue
                entry = Path(root, name)
                if entry.is_file():
                    if _suffix(name):
                        data.append(entry)
                    elif not _marker(name):
                        skipped.append(relative)
                elif entry.is_symlink() and not entry.exists() and _suffix(name):
                    raise InputError(
                        f"{entry} is a broken symbolic link (to {os.readlink(entry)}): fix or remove it, its "
                        "rows would be missing from the run"
                    )
                elif not entry.is_dir():  # a broken link without a data suffix, a FIFO, a socket
                    skipped.append(relative)
    # Path order (part by part: a/b.jsonl before a-b.jsonl, where S3 lists a-b.jsonl first): kept, as the order
    # of the rows makes their derived ids and the run id, which a run started before must find again.
    return [str(p) for p in sorted(data)], sorted(skipped)


def _dataset_files(folder: Path) -> list[str]:
    """Every visible file of a dataset saved with `save_to_disk` (its .arrow shards, state and info files), in
    the order S3 lists them."""
    files = [p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder).as_posix())]
    return [str(p) for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix())]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _skipped_note(skipped: list[str]) -> str:
    if not skipped:
        return ""
    more = ", ..." if skipped[SKIPPED_NAMED:] else ""
    return (
        f" ({len(skipped)} other file(s) skipped ({', '.join(skipped[:SKIPPED_NAMED])}{more}): a file's suffix "
        "picks its format, so rename them, or give one file's path with data.format)"
    )


def _warn_skipped(path: str, skipped: list[str]) -> None:
    if skipped:
        more = ", ..." if skipped[SKIPPED_NAMED:] else ""
        logger.warning(
            "data.path=%r: %d file(s) skipped, not named %s: %s%s (a file's suffix picks its format: rename "
            "the ones that hold prompts)",
            path,
            len(skipped),
            _known_suffixes(),
            ", ".join(skipped[:SKIPPED_NAMED]),
            more,
        )


@contextlib.contextmanager
def local_copy(file: str, endpoint_url: str | None, region: str | None) -> Iterator[str]:
    """A path on this machine holding `file`: the file itself, or an S3 object downloaded to a temporary one
    (in a canvasflow-input-* folder, which readers.remove_stale_downloads removes after a killed read)."""
    try:
        if not is_s3(file):
            path = Path(file).expanduser()
            if not path.is_file():
                raise StoreError(f"cannot read {file}: no such file")
            yield str(path)
            return
        bucket, key = split_s3_uri(file)
        store = S3Store(f"s3://{bucket}", S3Options(endpoint_url=endpoint_url, region=region))
        with tempfile.TemporaryDirectory(prefix="canvasflow-input-") as tmp:
            local = os.path.join(tmp, "object")
            store.download_file(key, local)
            yield local
    except StoreError as e:
        note = s3_input_note(endpoint_url) if is_s3(file) else ""
        raise InputError(f"cannot read input file: {e}{note}") from None
