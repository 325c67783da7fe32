"""Hugging Face datasets as input: one saved with `save_to_disk` (a local directory or an S3 prefix, downloaded
first) and `datasets.load_dataset` arguments (data.format=hf). Each gives an Arrow table, whose rows
pipeline/data/table_rows.py reads for the readers. Errors are InputError naming the dataset; the values of
load_dataset's arguments that may be secrets (tokens, storage options) never appear in them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config.schema import DataConfig
from pipeline.config.validate import without_userinfo
from pipeline.data.files import InputError, s3_input_note
from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, StoreError, is_s3, split_s3_uri

logger = logging.getLogger(__name__)


def _select_split(dataset: Any, data: DataConfig, where: str):
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if data.split is None:
            if len(dataset) == 1:
                return next(iter(dataset.values()))
            raise InputError(f"{where} has splits {list(dataset)}; choose one with data.split")
        if data.split not in dataset:
            raise InputError(f"data.split={data.split!r} is not a split of {where} ({list(dataset)})")
        return dataset[data.split]
    return dataset


@contextlib.contextmanager
def saved_dataset(
    path: str, data: DataConfig, files: list[str], endpoint_url: str | None, region: str | None
) -> Iterator[pa.Table]:
    """The table of a dataset saved with `save_to_disk`: a local directory, or an S3 prefix (downloaded to a
    temporary folder under TMPDIR that lives while the table is in use; datasets memory-maps its files)."""
    if not is_s3(path):
        yield load_saved(path, data, path)
        return
    with tempfile.TemporaryDirectory(prefix="canvasflow-dataset-") as tmp:
        download_prefix(path, files, tmp, endpoint_url, region)
        yield load_saved(tmp, data, path)


def download_prefix(
    path: str, files: list[str], folder: str, endpoint_url: str | None, region: str | None
) -> None:
    bucket, key = split_s3_uri(path)
    root = f"{key.rstrip('/')}/" if key else ""
    store = S3Store(f"s3://{bucket}", S3Options(endpoint_url=endpoint_url, region=region))
    started, size = time.monotonic(), 0
    logger.info("downloading the saved dataset %s (%d objects) to a temporary folder", path, len(files))
    try:
        for uri in files:
            object_key = uri[len(f"s3://{bucket}/") :]  # as listed: split_s3_uri would strip its slashes
            parts = object_key[len(root) :].split("/")
            if any(part in ("", ".", "..") for part in parts):  # e.g. ds//etc/x would write /etc/x
                raise InputError(
                    f"cannot download the saved dataset {path}: object {uri} does not map to a file below "
                    "it (empty, '.' or '..' path parts); remove it from the prefix"
                )
            dest = Path(folder, *parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            size += store.download_file(object_key, dest)
    except StoreError as e:
        raise InputError(
            f"cannot download the saved dataset {path}: {e}{s3_input_note(endpoint_url)}"
        ) from None
    except OSError as e:
        raise InputError(
            f"cannot download the saved dataset {path} to the temporary folder {folder}: {e}; set TMPDIR to a "
            "local folder with room for the dataset"
        ) from None
    logger.info("downloaded %.1f MB in %.1fs", size / 1e6, time.monotonic() - started)


def load_saved(path: str, data: DataConfig, where: str):
    """The table of a saved dataset at local `path`; `where` names it in errors (the S3 prefix it came from)."""
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - surfaced with the path
        empty = _without_data_files(path)
        if empty:
            raise InputError(_empty_message(where, empty, data)) from None
        message = str(e).replace(path, where)
        raise InputError(f"cannot load the saved dataset at {where}: {message}") from None
    from datasets import DatasetDict

    if data.split is not None and not isinstance(dataset, DatasetDict):
        raise InputError(
            f"data.split={data.split!r}, but the dataset saved at {where} has no splits (a Dataset, not a "
            "DatasetDict): unset data.split to read it, or point data.path at the dataset of that split"
        )
    return _select_split(dataset, data, where).data.table


def _without_data_files(path: str) -> list[str]:
    """The folders (relative to `path`, "." for itself) of a saved dataset whose state.json lists no data file:
    what save_to_disk writes for a dataset of no rows, which load_from_disk fails on ("list index out of
    range")."""
    empty = []
    for state in sorted(Path(path).glob("**/state.json")):
        try:
            files = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
        except (OSError, ValueError, AttributeError):
            continue
        if files == []:
            empty.append(state.parent.relative_to(path).as_posix())
    return empty


def _empty_message(where: str, empty: list[str], data: DataConfig) -> str:
    if empty == ["."]:
        return (
            f"data.path={where!r} holds no rows: the dataset saved there is empty (save_to_disk wrote no data "
            "file for it)"
        )
    splits = ", ".join(repr(name) for name in empty)
    fix = (
        f"point data.path at the folder of split {data.split!r} ({where.rstrip('/')}/{data.split})"
        if data.split and data.split not in empty
        else "save the dataset again without the empty split(s), or point data.path at another split's folder"
    )
    return (
        f"the dataset saved at {where} has empty split(s) {splits} (save_to_disk wrote no data file for them, "
        f"and datasets cannot load the dataset back): {fix}"
    )


def load_hub(path: str, data: DataConfig) -> pa.Table:
    """The table of `datasets.load_dataset` with data.hf_kwargs (data.format=hf; data.path=hf:<name>)."""
    from datasets import load_dataset

    kwargs = dict(data.hf_kwargs)
    named = {"path": path[len("hf:") :] if path.startswith("hf:") else None, "split": data.split}
    for key, value in named.items():  # given twice: the two must agree, else one would be ignored
        if value is not None and key in kwargs and kwargs[key] != value:
            raise InputError(
                f"data.{key}={getattr(data, key)!r} and data.hf_kwargs.{key}={kwargs[key]!r} disagree: both "
                f"give load_dataset's {key}; set it in one of them"
            )
        if value is not None:
            kwargs[key] = value
    if "path" not in kwargs:
        raise InputError("data.format=hf needs data.path=hf:<name> or data.hf_kwargs.path")
    if kwargs.get("streaming"):
        # Not supported rather than half-supported: the records of every row are built before any GPU work
        # anyway, and a loaded (not streamed) dataset is memory-mapped from the cache, so streaming would save
        # no memory while making each read of the input (ids are checked in a second one) a new download.
        raise InputError(
            "data.hf_kwargs.streaming=true is not supported: the input is read whole before generation and a "
            "loaded dataset is memory-mapped from the Hugging Face cache, not held in memory; remove "
            "data.hf_kwargs.streaming"
        )
    try:
        dataset = load_dataset(**kwargs)
    except Exception as e:  # noqa: BLE001 - surfaced with the argument names (values may be secrets)
        raise InputError(
            redact(
                f"datasets.load_dataset failed for data.path={data.path!r} (arguments: "
                f"{', '.join(sorted(kwargs))}): {e}",
                kwargs,
            )
        ) from None
    return _select_split(dataset, data, str(kwargs["path"])).data.table


URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# load_dataset arguments that name data, never a secret: their values stay in error messages (a missing
# data_files entry is the file to fix).
PUBLIC_HF_ARGS = frozenset({"path", "split", "name", "data_files", "data_dir", "cache_dir", "revision"})


def redact(message: str, kwargs: dict[str, Any]) -> str:
    """`message` without the text values of the other arguments, at any depth (a token, a secret, a header
    in storage_options or headers)."""

    def texts(value: Any):
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            for inner in value.values():
                yield from texts(inner)
        elif isinstance(value, Sequence) and not isinstance(value, bytes):
            for inner in value:
                yield from texts(inner)

    hidden = {t for name, v in kwargs.items() if name not in PUBLIC_HF_ARGS for t in texts(v) if len(t) >= 4}
    for text in sorted(hidden, key=len, reverse=True):  # a longer value first: it may contain a shorter one
        message = message.replace(text, "***")
    # A public argument may still carry a password (data_files=https://user:token@host/...).
    return URL.sub(lambda m: without_userinfo(m.group()), message)
