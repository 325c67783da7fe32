"""The start-up checks of a job's model (model.path: a local directory, a builtin or an s3:// prefix), before
any worker loads it: its config, its tokenizer where the job needs it, and its weight files, from their
safetensors headers (an s3:// model's by ranged GETs; the weights themselves are never read here).

Every run checks that each weight file is there and holds the bytes its header lists (a copy cut short fails
the job here, not in every worker once the cluster has started, and on s3:// before every node downloaded
it). A dry run also compares each tensor's shape with the one config.json implies, which builds the model on
torch's meta device: weights and a config.json of different models fail its check, not the workers' loads.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config.schema import JobConfig
from pipeline.io.s3 import S3Store
from pipeline.io.store import S3Options, StoreError, is_s3, split_s3_uri
from pipeline.models.loader import (
    MASK_FAMILIES,
    ModelError,
    ModelInfo,
    inspect_model,
    load_tokenizer,
    resolve_model_dir,
)
from pipeline.models.weights import (
    INDEX_FILE,
    WEIGHTS_FILE,
    check_weight_files,
    compare_shapes,
    read_header,
    read_weight_map,
    tensor_shapes,
)
from pipeline.runner.identity import CONTENT_FILES, local_model_identity, s3_model_identity, s3_objects

# The files a tokenizer and its chat template load from (runner/identity.py hashes them with the config).
TOKENIZER_FILES = tuple(name for name in CONTENT_FILES if name != "model.safetensors.index.json")
HEADER_READERS = 16  # an s3:// checkpoint's weight files whose headers are read at once


def inspect_job_model(
    job: JobConfig, *, tokenizer: bool = False, shapes: bool = False
) -> tuple[ModelInfo, str, Any]:
    """ModelInfo, identity digest (runner/identity.py: config, tokenizer and chat-template files by content,
    weights by a sampled fingerprint, or by size and ETag on s3://), and with `tokenizer` the model's tokenizer
    (else None). With `shapes`, the tensors' shapes are checked against config.json. An s3:// model is not
    downloaded here: only its config files, and with `tokenizer` its tokenizer and chat-template files
    (megabytes, not the weights)."""
    path = job.model.path
    if not is_s3(path):
        model_dir = resolve_model_dir(path, cache_dir=job.model.cache_dir)
        info = inspect_model(model_dir, name=path if path.startswith("builtin:") else None)
        try:  # the weight files' headers only: a missing or cut file fails here, not in every worker
            found = check_weight_files(Path(model_dir))
            if shapes:
                check_shapes(info.family, model_dir, found)
        except ValueError as e:
            raise ModelError(f"model.path={path!r}: {e}") from None
        loaded = (
            load_tokenizer(model_dir, remote_code_free=info.family in MASK_FAMILIES) if tokenizer else None
        )
        return info, local_model_identity(model_dir), loaded
    bucket, prefix = split_s3_uri(path)
    store = S3Store(f"s3://{bucket}/{prefix}", S3Options(job.output.endpoint_url, job.output.region))
    try:
        objects = s3_objects(store)
        keys = list(objects)
        if "config.json" not in keys:
            raise ModelError(f"model.path={path!r} has no config.json")
        found = _check_s3_weights(store, path, {key: item["size"] for key, item in objects.items()})
        wanted = TOKENIZER_FILES if tokenizer else ("config.json", "generation_config.json")
        with tempfile.TemporaryDirectory() as tmp:
            for name in wanted:
                if name in keys:
                    store.download_file(name, os.path.join(tmp, name))
            info = inspect_model(tmp, name=path.rstrip("/").rsplit("/", 1)[-1])
            try:
                if shapes:
                    check_shapes(info.family, tmp, found)
                loaded = (
                    load_tokenizer(tmp, remote_code_free=info.family in MASK_FAMILIES) if tokenizer else None
                )
            except ModelError as e:  # it names the temporary folder the files were read from
                raise ModelError(str(e).replace(tmp, path.rstrip("/"))) from None
            except ValueError as e:  # the shapes
                raise ModelError(f"model.path={path!r}: {e}") from None
    except StoreError as e:
        raise ModelError(f"model.path={path!r} cannot be read: {e}") from None
    info.model_dir = path
    return info, s3_model_identity(path, objects), loaded


def check_shapes(family: str, config_dir: str, found: dict[str, tuple[int, ...]]) -> None:
    """ValueError naming the tensors unless the checkpoint (`found`: tensor name -> shape, from its headers)
    holds every tensor the model reads, each of the shape config.json (in `config_dir`) implies."""
    if family in MASK_FAMILIES:
        from pipeline.models.mask_checkpoint import checkpoint_shapes

        compare_shapes(checkpoint_shapes(config_dir), found)
    else:
        from pipeline.models.gemma_checkpoint import checkpoint_shapes as gemma_shapes

        expected, optional = gemma_shapes(config_dir)
        compare_shapes(expected, found, optional)


def _check_s3_weights(store: S3Store, path: str, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """ModelError unless the weight files of the s3:// model are all there (model.safetensors, or every file
    its model.safetensors.index.json names) and each holds the bytes its safetensors header lists, before any
    worker downloads them. Returns each tensor's shape, from the headers (two ranged GETs per file)."""
    if WEIGHTS_FILE in sizes:
        files = [WEIGHTS_FILE]
    elif INDEX_FILE not in sizes:
        raise ModelError(f"model.path={path!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    else:
        try:
            weight_map = read_weight_map(store.read_bytes(INDEX_FILE), store.describe(INDEX_FILE))
        except ValueError as e:
            raise ModelError(str(e)) from None
        files = sorted({str(file) for file in weight_map.values()})
        missing = [file for file in files if file not in sizes]
        if missing:
            raise ModelError(
                f"{store.describe(INDEX_FILE)} names {len(missing)} weight file(s) that are not there: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )

    def header(key: str) -> dict[str, Any]:
        try:
            return read_header(lambda offset, length: store.read_range(key, offset, length), sizes[key])
        except ValueError as e:
            raise ModelError(
                f"{store.describe(key)} is not a readable safetensors file ({e}): upload it again"
            ) from None

    found: dict[str, tuple[int, ...]] = {}
    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(files))) as pool:
        for parsed in pool.map(header, files):
            found.update(tensor_shapes(parsed))
    return found
