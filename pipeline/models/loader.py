"""Finds and loads a model: a local Hugging Face directory, an s3:// prefix, or a builtin model.

`inspect_model` reads only config files (cheap; the driver uses it to validate a job before any GPU work);
`load_model` also loads the weights and the tokenizer (once per actor). Builtins:

  builtin:tiny-diffusiongemma         the shipped trained tiny model (pipeline/assets/), or the random one
                                      if the package carries no trained checkpoint
  builtin:tiny-diffusiongemma-random  a randomly initialised tiny model, built deterministically on first
                                      use into the cache directory
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.sampler.settings import read_generation_config

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_TINY = "builtin:tiny-diffusiongemma"
BUILTIN_TINY_RANDOM = "builtin:tiny-diffusiongemma-random"
SUPPORTED_TYPES = ("diffusion_gemma",)


class ModelError(ValueError):
    """The model cannot be found or loaded; the message names the path and how to fix it."""


def default_cache_dir() -> Path:
    """$CANVASFLOW_CACHE, else ~/.cache/canvasflow (an empty variable counts as unset)."""
    return Path(os.environ.get("CANVASFLOW_CACHE") or Path.home() / ".cache" / "canvasflow")


@dataclass
class ModelInfo:
    model_dir: str
    name: str
    model_type: str
    canvas_length: int
    vocab_size: int
    context_window: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    generation_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    info: ModelInfo
    model: Any  # pipeline.models.diffusion_gemma.DiffusionGemmaTextModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase


def _build_random_tiny(cache_dir: Path) -> Path:
    from pipeline.models.tiny import build_tiny_model

    target = cache_dir / "builtin" / "tiny-diffusiongemma-random-v1"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several actors on one node may start together
        if not (target / ".complete").exists():
            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, seed=0)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            logger.info("built the random tiny model in %s", target)
    return target


def resolve_model_dir(
    path: str,
    *,
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> str:
    """A local directory holding the model (downloading or building it when needed). Models from s3:// are
    cached in `cache_dir` (default: <cache>/models), builtins built on first use in <cache>/builtin."""
    if path == BUILTIN_TINY:
        shipped = ASSETS / "tiny-diffusiongemma"
        if (shipped / "config.json").exists():
            return str(shipped)
        return str(_build_random_tiny(default_cache_dir()))
    if path == BUILTIN_TINY_RANDOM:
        return str(_build_random_tiny(default_cache_dir()))
    if path.startswith("builtin:"):
        raise ModelError(f"model.path={path!r}: unknown builtin; use {BUILTIN_TINY} or {BUILTIN_TINY_RANDOM}")
    if path.startswith("s3://"):
        from pipeline.models.fetch import resolve_model_dir as fetch_s3

        models = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "models"
        return fetch_s3(path, cache_dir=str(models), endpoint_url=endpoint_url, region=region)
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ModelError(
            f"model.path={path!r} is not a directory; give a Hugging Face model directory or s3:// URI"
        )
    if not (local / "config.json").exists():
        raise ModelError(f"model.path={path!r} has no config.json; is it a Hugging Face model directory?")
    return str(local)


def inspect_model(model_dir: str, name: str | None = None) -> ModelInfo:
    """Reads config.json and generation_config.json (no weights)."""
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} is not supported; canvasflow runs {', '.join(SUPPORTED_TYPES)}"
        )
    text = config.get("text_config", {})
    eos = text.get("eos_token_id", 1)
    generation = read_generation_config(model_dir)
    return ModelInfo(
        model_dir=model_dir,
        name=name or Path(model_dir).name,
        model_type=model_type,
        canvas_length=int(config.get("canvas_length", 256)),
        vocab_size=int(text.get("vocab_size", 262_144)),
        context_window=int(text.get("max_position_embeddings", 131_072)),
        eos_token_ids=tuple(generation.get("eos_token_ids", eos if isinstance(eos, list) else [eos])),
        pad_token_id=int(generation.get("pad_token_id", text.get("pad_token_id", 0) or 0)),
        generation_config=generation,
    )


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "model.device=cuda but no CUDA device is visible to this process; use model.device=auto"
        )
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - surfaced with the path
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {e}") from e


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> LoadedModel:
    """Loads weights and tokenizer of the model at `path` (see module docstring) for the sampler."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel

    model_dir = resolve_model_dir(path, cache_dir=cache_dir, endpoint_url=endpoint_url, region=region)
    info = inspect_model(model_dir, name=path if path.startswith("builtin:") else None)
    device_name = pick_device(device)
    torch_dtype = pick_dtype(dtype, device_name)
    hf_logging.disable_progress_bar()
    try:
        hf_model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 - surfaced with the path
        raise ModelError(f"cannot load the weights from {model_dir}: {e}") from e
    hf_model.eval().requires_grad_(False)
    native = DiffusionGemmaTextModel(hf_model).to(device_name)
    del hf_model  # the vision tower is not needed; the text weights live on in `native`
    return LoadedModel(info=info, model=native, tokenizer=load_tokenizer(model_dir))
