"""Loads and writes mask-diffusion checkpoints (LLaDA, Dream) in their published Hugging Face layout.

No remote code runs: config.json is read as JSON, the weights with safetensors (`model.safetensors`, or the
shards named by `model.safetensors.index.json`), each tensor renamed from its published name to the native
module's (llada.py / dream.py) and cast to the requested dtype. The module is built on the meta device and
takes the loaded tensors as its parameters, so an 8B checkpoint is never materialised twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pipeline.models import dream, llada
from pipeline.models.bidirectional import BidirectionalLM, MaskLMSpec, rope_inv_freq
from pipeline.models.weights import WEIGHTS_FILE, describe_missing, read_tensors, weight_files

logger = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {llada.MODEL_TYPE: llada, dream.MODEL_TYPE: dream}


def family_module(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a mask-diffusion family ({', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def spec_for(model_dir: str | os.PathLike[str], config: dict[str, Any] | None = None) -> MaskLMSpec:
    config = config if config is not None else read_config(model_dir)
    return family_module(config.get("model_type", "")).spec_from_config(config, str(model_dir))


def load_mask_model(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BidirectionalLM:
    """The native module with the checkpoint's weights (every published tensor accounted for)."""
    model_dir = Path(model_dir)
    model, wanted = _meta_model(model_dir)
    shapes = model.state_dict()
    files = weight_files(model_dir)
    missing = set(wanted) - set(files)
    if missing:
        raise ValueError(describe_missing(model_dir, missing))
    unused = sorted(set(files) - set(wanted))
    if unused:
        logger.warning(
            "%s: ignoring %d tensor(s) not used by the model: %s", model_dir, len(unused), unused[:5]
        )
    published_shapes = {published: shapes[native].shape for published, native in wanted.items()}
    tensors = read_tensors(model_dir, files, published_shapes, dtype=dtype, device=device)
    state = {wanted[published]: tensor for published, tensor in tensors.items()}
    model.load_state_dict(state, assign=True, strict=True)
    # inv_freq was built on the meta device with the module
    model.register_buffer("inv_freq", rope_inv_freq(model.spec, device), persistent=False)
    return model.eval().requires_grad_(False)


def checkpoint_shapes(model_dir: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> the shape config.json implies (the module built on the meta device)."""
    model, wanted = _meta_model(Path(model_dir))
    shapes = model.state_dict()
    return {published: tuple(shapes[native].shape) for published, native in wanted.items()}


def _meta_model(model_dir: Path) -> tuple[BidirectionalLM, dict[str, str]]:
    """The native module on the meta device, and published tensor name -> native name."""
    config = read_config(model_dir)
    family = family_module(config.get("model_type", ""))
    with torch.device("meta"):
        model = BidirectionalLM(spec_for(model_dir, config))
    return model, {family.published_name(name): name for name in model.state_dict()}


def save_mask_checkpoint(
    model: BidirectionalLM, out_dir: str | os.PathLike[str], config: dict[str, Any]
) -> Path:
    """Writes config.json and model.safetensors (published names, contiguous CPU tensors) to `out_dir`."""
    from safetensors.torch import save_file

    family = family_module(config["model_type"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        family.published_name(name): t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out
