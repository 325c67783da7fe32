"""Finds and loads a model: a local Hugging Face directory, an s3:// prefix, or a builtin model.

`inspect_model` reads only config files (cheap; the driver uses it to validate a job before any GPU work);
`load_model` also loads the weights and the tokenizer (once per actor). Builtins:

  builtin:tiny-diffusiongemma         the shipped trained tiny model (pipeline/assets/), or the random one
                                      if the package carries no trained checkpoint
  builtin:tiny-diffusiongemma-random  a randomly initialised tiny model, built deterministically on first
                                      use into the cache directory
  builtin:tiny-llada                  the shipped trained tiny LLaDA-architecture model, or a random one

Mask-diffusion families (model_type "llada", "Dream") load without remote code through mask_checkpoint.py.
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

from pipeline.sampler.settings import is_int, read_generation_config

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_TINY = "builtin:tiny-diffusiongemma"
BUILTIN_TINY_RANDOM = "builtin:tiny-diffusiongemma-random"
BUILTIN_TINY_LLADA = "builtin:tiny-llada"
# config.json model_type -> model family (model.family in the job config)
FAMILY_OF_TYPE = {"diffusion_gemma": "diffusion_gemma", "llada": "llada", "Dream": "dream"}
SUPPORTED_TYPES = tuple(FAMILY_OF_TYPE)
MASK_FAMILIES = ("llada", "dream")


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
    family: str = "diffusion_gemma"
    mask_token_id: int | None = None  # mask-diffusion families


@dataclass
class LoadedModel:
    info: ModelInfo
    model: Any  # pipeline.models.diffusion_gemma.DiffusionGemmaTextModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase


def _build_random_tiny(cache_dir: Path, family: str = "diffusion_gemma") -> Path:
    from pipeline.models.tiny import build_tiny_model

    if family == "diffusion_gemma":
        target, build = cache_dir / "builtin" / "tiny-diffusiongemma-random-v1", build_tiny_model
    else:
        target = cache_dir / "builtin" / f"tiny-{family}-random-v1"

        def build(out: Path, seed: int) -> Path:
            from pipeline.models.tiny_mask import build_tiny_mask_model

            return build_tiny_mask_model(out, family=family, seed=seed)

    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several actors on one node may start together
        if not (target / ".complete").exists():
            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp, seed=0)
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
    version: str | None = None,
) -> str:
    """A local directory holding the model (downloading or building it when needed). Models from s3:// are
    cached in `cache_dir` (default: <cache>/models) per content `version` (fetch.resolve_model_dir), builtins
    built on first use in <cache>/builtin."""
    if path == BUILTIN_TINY:
        shipped = ASSETS / "tiny-diffusiongemma"
        if (shipped / "config.json").exists():
            return str(shipped)
        return str(_build_random_tiny(default_cache_dir()))
    if path == BUILTIN_TINY_RANDOM:
        return str(_build_random_tiny(default_cache_dir()))
    if path == BUILTIN_TINY_LLADA:
        shipped = ASSETS / "tiny-llada"
        if (shipped / "config.json").exists():
            return str(shipped)
        return str(_build_random_tiny(default_cache_dir(), "llada"))
    if path.startswith("builtin:"):
        raise ModelError(
            f"model.path={path!r}: unknown builtin; use {BUILTIN_TINY}, {BUILTIN_TINY_RANDOM} or {BUILTIN_TINY_LLADA}"
        )
    if path.startswith("s3://"):
        from pipeline.models.fetch import resolve_model_dir as fetch_s3

        models = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "models"
        return fetch_s3(
            path, cache_dir=str(models), endpoint_url=endpoint_url, region=region, version=version
        )
    local = Path(path).expanduser()
    if not local.is_dir():
        raise ModelError(
            f"model.path={path!r} is not a directory; give a Hugging Face model directory or s3:// URI"
        )
    if not (local / "config.json").exists():
        raise ModelError(f"model.path={path!r} has no config.json; is it a Hugging Face model directory?")
    return str(local)


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ModelError naming the file when it is not one (truncated, not UTF-8, ...)."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path} is not valid UTF-8 (byte {e.start}); re-create or re-download it") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); re-create or re-download it") from None
    if not isinstance(config, dict):
        raise ModelError(
            f"{path} is not a JSON object (got a {type(config).__name__}): is it a model config?"
        )
    return config


def inspect_model(model_dir: str, name: str | None = None) -> ModelInfo:
    """Reads config.json and generation_config.json (no weights)."""
    config = read_config_json(Path(model_dir) / "config.json")
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} is not supported; canvasflow runs {', '.join(SUPPORTED_TYPES)}"
        )
    if FAMILY_OF_TYPE[model_type] in MASK_FAMILIES:
        return _inspect_mask_model(model_dir, config, name)
    from pipeline.models.gemma_config import parse_config

    try:
        parsed = parse_config(config)  # the architecture checked here, before any worker starts
    except ValueError as e:
        raise ModelError(f"{Path(model_dir) / 'config.json'}: {e}") from None
    text = config.get("text_config") or {}
    eos = text.get("eos_token_id", 1)
    generation = read_generation_config(model_dir)
    vocab_size = parsed.text_config.vocab_size
    eos_ids, pad = special_tokens(
        model_dir,
        generation,
        [] if eos is None else eos if isinstance(eos, list) else [eos],
        text.get("pad_token_id", 0) or 0,
        vocab_size,
        config_keys="text_config.",
    )
    return ModelInfo(
        model_dir=model_dir,
        name=name or Path(model_dir).name,
        model_type=model_type,
        canvas_length=parsed.canvas_length,
        vocab_size=vocab_size,
        context_window=parsed.text_config.max_position_embeddings,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        generation_config=generation,
    )


def special_tokens(
    model_dir: str,
    generation: dict[str, Any],
    eos: list[Any],
    pad: Any,
    vocab_size: int,
    *,
    config_keys: str = "",
) -> tuple[tuple[int, ...], int]:
    """The EOS ids and the pad id: generation_config.json's (parsed), else config.json's `eos` and `pad`
    (under `config_keys`). ModelError naming the file and key when one is not a token of the vocabulary: a pad
    id past it fails every batch's embedding lookup (an IndexError in every shard), an EOS id past it never
    ends a row."""
    eos_ids = tuple(generation.get("eos_token_ids", eos))
    pad = generation.get("pad_token_id", pad)
    for key, value, ids in (("eos_token_id", list(eos_ids), eos_ids), ("pad_token_id", pad, (pad,))):
        if all(is_int(i) and 0 <= i < vocab_size for i in ids):
            continue
        parsed_key = "eos_token_ids" if key == "eos_token_id" else key  # read_generation_config's names
        source, prefix = (
            ("generation_config.json", "") if parsed_key in generation else ("config.json", config_keys)
        )
        raise ModelError(
            f"{Path(model_dir) / source}: {prefix}{key}={value!r} is not a token id of the model's vocabulary "
            f"(0 to {vocab_size - 1}, vocab_size={vocab_size}): fix the file"
        )
    return eos_ids, pad


def _inspect_mask_model(model_dir: str, config: dict[str, Any], name: str | None) -> ModelInfo:
    from pipeline.models.mask_checkpoint import spec_for
    from pipeline.sampler.mask.settings import read_mask_generation_config

    try:
        spec = spec_for(model_dir, config)
    except ValueError as e:
        raise ModelError(str(e)) from None
    eos = config.get("eos_token_id")
    generation = read_mask_generation_config(model_dir)
    default_eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    pad = config.get("pad_token_id")
    eos_ids, pad_id = special_tokens(
        model_dir,
        generation,
        default_eos,
        pad if pad is not None else (default_eos or [0])[0],
        spec.vocab_size,
    )
    return ModelInfo(
        model_dir=model_dir,
        name=name or Path(model_dir).name,
        model_type=config["model_type"],
        canvas_length=0,  # no canvases: blocks of sampler.mask.block_length
        vocab_size=spec.vocab_size,
        context_window=spec.context_window,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        generation_config=generation,
        family=spec.family,
        mask_token_id=spec.mask_token_id,
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


def dtype_name(dtype: str, device: str) -> str:
    """model.dtype as loaded on `device` ('cuda' or 'cpu'): auto is bfloat16 on a GPU, float32 on a CPU."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def pick_dtype(dtype: str, device: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype_name(dtype, device)
    ]


# tokenizer_config.json's tokenizer_class (a "Fast" suffix stripped) -> the class AutoTokenizer loads for it
# in a DiffusionGemma checkpoint (model type registered with GemmaTokenizer; the generic names resolve to
# TokenizersBackend there). Loading it directly skips AutoTokenizer's reading of config.json through
# transformers' config classes (1.5-2 s of imports per process).
DECLARED_TOKENIZERS = {
    "GemmaTokenizer": "GemmaTokenizer",
    "TokenizersBackend": "TokenizersBackend",
    "PreTrainedTokenizer": "TokenizersBackend",
}


def load_tokenizer(model_dir: str, *, remote_code_free: bool = False):
    """The model's tokenizer. `remote_code_free` (mask families, whose config.json and tokenizer_config.json
    name custom classes) reads tokenizer.json, or vocab.json + merges.txt (Qwen2's BPE, Dream), directly. A
    DiffusionGemma tokenizer whose class tokenizer_config.json names (DECLARED_TOKENIZERS) loads as that class,
    as AutoTokenizer would; any other goes through AutoTokenizer."""
    import transformers

    try:
        if not remote_code_free:
            declared = getattr(transformers, _declared_tokenizer(model_dir) or "AutoTokenizer", None)
            return (declared or transformers.AutoTokenizer).from_pretrained(model_dir)
        if (Path(model_dir) / "tokenizer.json").exists():
            return transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
        return transformers.Qwen2TokenizerFast.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - surfaced with the path
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {e}") from e


def _declared_tokenizer(model_dir: str) -> str | None:
    """The transformers class for tokenizer_config.json's tokenizer_class, if DECLARED_TOKENIZERS maps it and
    no auto_map (remote code) is declared; else None."""
    try:
        config = json.loads((Path(model_dir) / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:
        return None
    name = config.get("tokenizer_class")
    return DECLARED_TOKENIZERS.get(name.removesuffix("Fast")) if isinstance(name, str) else None


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    version: str | None = None,
) -> LoadedModel:
    """Loads weights and tokenizer of the model at `path` (see module docstring) for the sampler; `version`:
    the content version of an s3:// model (resolve_model_dir)."""
    model_dir = resolve_model_dir(
        path, cache_dir=cache_dir, endpoint_url=endpoint_url, region=region, version=version
    )
    info = inspect_model(model_dir, name=path if path.startswith("builtin:") else None)
    device_name = pick_device(device)
    torch_dtype = pick_dtype(dtype, device_name)
    if info.family in MASK_FAMILIES:
        from pipeline.models.mask_checkpoint import load_mask_model

        try:
            native = load_mask_model(model_dir, dtype=torch_dtype, device=device_name)
        except (OSError, ValueError) as e:
            raise _weights_error(model_dir, e) from e
        return LoadedModel(
            info=info, model=native, tokenizer=load_tokenizer(model_dir, remote_code_free=True)
        )
    from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
    from pipeline.models.gemma_checkpoint import load_text_weights

    try:
        weights = load_text_weights(model_dir, dtype=torch_dtype, device=device_name)
    except Exception as e:  # noqa: BLE001 - surfaced with the path (config, safetensors and shape errors)
        raise _weights_error(model_dir, e) from e
    try:
        native = DiffusionGemmaTextModel(weights)
    except ValueError as e:  # a config the forward does not run (a bidirectional encoder, ...)
        raise ModelError(f"{model_dir}: {e}") from e
    return LoadedModel(info=info, model=native, tokenizer=load_tokenizer(model_dir))


def _weights_error(model_dir: str | os.PathLike[str], e: Exception) -> ModelError:
    """The ModelError of weights that do not load, naming the directory once (the readers' messages may
    start with it: "/m: /m: tensor ... has shape ...")."""
    return ModelError(f"cannot load the weights from {model_dir}: {str(e).removeprefix(f'{model_dir}: ')}")
