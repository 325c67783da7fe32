"""What makes two runs "the same": fingerprints of the input and of every setting that changes outputs.

Settings that cannot change a row's output are left out on purpose: where it is written, how many workers
or slots, batching mode, retry and progress settings. So a resumed run may use a bigger cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.config.schema import JobConfig


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(
    model_dir: str | None, config_text: str, generation_text: str, weights: dict[str, int]
) -> str:
    """Digest of the model's config, generation config and weight file sizes."""
    del model_dir  # the location does not matter, the content does
    return _digest({"config": config_text, "generation": generation_text, "weights": sorted(weights.items())})


def local_model_identity(model_dir: str) -> str:
    root = Path(model_dir)
    read = lambda name: (root / name).read_text(encoding="utf-8") if (root / name).exists() else ""  # noqa: E731
    weights = {p.name: p.stat().st_size for p in root.glob("*.safetensors")}
    return model_identity(model_dir, read("config.json"), read("generation_config.json"), weights)


def config_fingerprint(job: JobConfig, model_id: str, sampler_settings: dict[str, Any]) -> str:
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
        },
        "postprocess": job.postprocess,
    }
    return _digest(relevant)


def derive_run_id(data_path: str, input_fingerprint: str, config_fp: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data_path.rstrip("/")).name.split(".")[0]).strip("-._")
    stem = (stem or "run")[:40]
    return f"{stem}-{_digest([input_fingerprint, config_fp])[:10]}"
