"""What makes two runs "the same": fingerprints of the input and of every setting that changes outputs.

Settings that cannot change a row's output are left out on purpose: where it is written, how many workers
or slots, batching mode, retry and progress settings. So a resumed run may use a bigger cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.config.redact import redact
from pipeline.config.schema import JobConfig


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# Files that change what the model generates besides its weights, hashed by content. The chat template may
# live in tokenizer_config.json, chat_template.jinja or chat_template.json; the tokenizer in tokenizer.json,
# tokenizer.model (SentencePiece) or vocab.json + merges.txt.
CONTENT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
)
WEIGHT_SUFFIX = ".safetensors"
# A weight file is fingerprinted without reading it whole (checkpoints can be tens of GB): its size, its
# safetensors header (tensor names, dtypes, shapes, offsets, metadata) and SAMPLE_BLOCKS blocks of SAMPLE_BYTES
# at fixed offsets spread evenly over the tensor data. A file up to SAMPLE_BLOCKS * SAMPLE_BYTES is hashed whole.
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def model_identity(model_dir: str | None, files: dict[str, Any], weights: dict[str, Any]) -> str:
    """Digest of the model's content: `files` (name -> content digest of CONTENT_FILES present) and `weights`
    (name -> fingerprint of each *.safetensors: local sampled digest, or S3 size + ETag)."""
    del model_dir  # the location does not matter, the content does
    return _digest({"files": sorted(files.items()), "weights": sorted(weights.items())})


def weight_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size + sha256 of the header and of the sampled blocks of one safetensors file (see SAMPLE_BLOCKS)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
            return {"size": size, "sha256": h.hexdigest(), "sampled": False}
        first = f.read(8)
        declared = int.from_bytes(first, "little") if len(first) == 8 else 0
        header_end = 8 + declared if 0 < declared <= min(size - 8, MAX_HEADER_BYTES) else SAMPLE_BYTES
        f.seek(0)
        h.update(f.read(header_end))
        span = size - header_end
        for i in range(SAMPLE_BLOCKS):
            offset = header_end + max(0, span - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1)
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sha256": h.hexdigest(), "sampled": True}


def local_model_identity(model_dir: str) -> str:
    root = Path(model_dir)
    files = {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest()
        for name in CONTENT_FILES
        if (root / name).is_file()
    }
    weights = {p.name: weight_fingerprint(p) for p in sorted(root.glob(f"*{WEIGHT_SUFFIX}"))}
    return model_identity(model_dir, files, weights)


def s3_objects(store: Any) -> dict[str, dict[str, Any]]:
    """Key (relative to the store's prefix) -> {size, etag} of every object under an S3Store, in one listing
    (ListObjectsV2 returns both; nothing is downloaded)."""
    from pipeline.io.s3 import call_with_retries

    strip = len(f"{store.prefix}/") if store.prefix else 0
    full = f"{store.prefix}/" if store.prefix else ""

    def page_all() -> dict[str, dict[str, Any]]:
        objects: dict[str, dict[str, Any]] = {}
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=full):
            for item in page.get("Contents", []):
                objects[item["Key"][strip:]] = {
                    "size": int(item["Size"]),
                    "etag": str(item.get("ETag", "")).strip('"'),
                }
        return objects

    return dict(sorted(call_with_retries(f"list {store.describe()}", page_all, store.options).items()))


def s3_model_identity(model_uri: str, objects: dict[str, dict[str, Any]]) -> str:
    """Identity of a model under s3://: each content file and weight file by its size and ETag (the store's
    content hash: a replaced object gets a new ETag even when its size is unchanged)."""
    files = {name: objects[name] for name in CONTENT_FILES if name in objects}
    weights = {k: v for k, v in objects.items() if k.endswith(WEIGHT_SUFFIX)}
    return model_identity(model_uri, files, weights)


def config_fingerprint(job: JobConfig, model_id: str, sampler_settings: dict[str, Any]) -> str:
    return _digest(config_settings(job, model_id, sampler_settings))


def config_settings(job: JobConfig, model_id: str, sampler_settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that change outputs, which `config_fingerprint` digests: recorded in _run.json, so that a
    rerun refused for another config can say which setting changed."""
    relevant = {
        "model": {
            "identity": model_id,
            "dtype": job.model.dtype,
            "max_prompt_tokens": job.model.max_prompt_tokens,
        },
        "sampler": sampler_settings,
        "data": {
            "prompt_column": job.data.prompt_column,
            "messages_column": job.data.messages_column,
            "id_column": job.data.id_column,
            "apply_chat_template": job.data.apply_chat_template,
            # only when set, so that the fingerprints (and derived run ids) of runs without them stay as they were
            **{
                k: v
                for k in ("prompt_template", "system_prompt", "metadata_columns")
                if (v := getattr(job.data, k)) is not None
            },
        },
        # Secret-like keyword arguments (an API key) count by name, not value: rotating a key neither starts
        # a new run nor is refused as another config, and no digest of a secret reaches _run.json or the card.
        "postprocess": redact(job.postprocess),
    }
    if job.sampler.completions_per_prompt != 1:  # only then, so that other runs keep their identity (and id)
        relevant["completions_per_prompt"] = job.sampler.completions_per_prompt
    return relevant


def derive_run_id(data_path: str, input_fingerprint: str, config_fp: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data_path.rstrip("/")).name.split(".")[0]).strip("-._")
    stem = (stem or "run")[:40]
    return f"{stem}-{_digest([input_fingerprint, config_fp])[:10]}"
