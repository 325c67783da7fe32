"""Reads a checkpoint's safetensors (`model.safetensors`, or the shards `model.safetensors.index.json` names)
tensor by tensor, each cast to the model's dtype and moved to its device as it is read: the weights are never
held twice, and nothing of transformers' modeling is imported. `check_weight_files` checks the files' headers
only, without torch, for the driver's start-up checks."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver checks weight files without importing torch (2 s, 140 MB)
    import torch

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def read_weight_map(data: bytes, where: str) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json (`data`, read from `where`): published tensor name ->
    the file holding it. ValueError naming `where` when it is not one."""
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 (a UnicodeDecodeError is one) or not JSON
        raise ValueError(f"{where} is not a JSON file ({e}): re-download it") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where} has no weight_map")
    return weight_map


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Published tensor name -> the file holding it. A single model.safetensors comes first where an index is
    also present, as in transformers' from_pretrained."""
    index = model_dir / INDEX_FILE
    single = model_dir / WEIGHTS_FILE
    if index.exists() and not single.exists():
        weight_map = read_weight_map(index.read_bytes(), str(index))
        return {name: model_dir / file for name, file in weight_map.items()}
    if not single.exists():
        raise ValueError(f"{model_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:  # noqa: BLE001 - safetensors' own errors (SafetensorError) and OSError
        raise ValueError(
            f"{single} is not a readable safetensors file ({e}): copy or download it again"
        ) from None


def check_weight_files(model_dir: Path) -> None:
    """ValueError naming the file unless every weight file of the checkpoint is there, its safetensors header
    reads and the file holds the bytes its header lists (a copy cut short fails here). Reads the headers only,
    and imports neither torch nor safetensors: the driver runs it at start-up, so that a missing or truncated
    file fails the job there, not in every worker once the cluster has started."""
    index = model_dir / INDEX_FILE
    single = model_dir / WEIGHTS_FILE
    if not single.exists() and not index.exists():
        raise ValueError(f"{model_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    files = [single] if single.exists() else sorted(set(weight_files(model_dir).values()))
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}, named by {index}, does not exist")
        problem = _header_problem(file)
        if problem:
            raise ValueError(
                f"{file} is not a readable safetensors file ({problem}): copy or download it again"
            )


def _header_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's header (8-byte length, then JSON naming each tensor's byte range
    in the data that follows), or None."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header claims {length} bytes; the file has {size}"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            return f"its header is not JSON: {e}"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
    ]
    data = size - 8 - length
    if not all(isinstance(end, int) for end in ends):
        return "its header lists tensors without byte offsets"
    if ends and max(ends) > data:
        return f"its tensors need {max(ends)} bytes of data; the file has {data}: it was cut short"
    return None


def describe_missing(model_dir: Path, missing: Iterable[str]) -> str:
    missing = sorted(missing)
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s): {shown}"


def read_tensors(
    model_dir: Path,
    files: Mapping[str, Path],
    shapes: Mapping[str, torch.Size],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    """The tensors named in `shapes` (published names, each in `files`), read file by file, each checked
    against its expected shape (ValueError naming it) and cast to `dtype` on `device`."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.shape != shapes[name]:
                    raise ValueError(
                        f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}; the config implies "
                        f"{tuple(shapes[name])}"
                    )
                out[name] = tensor.to(device=device, dtype=dtype)
    return out
