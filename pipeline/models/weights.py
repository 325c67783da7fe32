"""Reads a checkpoint's safetensors (`model.safetensors`, or the shards `model.safetensors.index.json` names)
tensor by tensor, each cast to the model's dtype and moved to its device as it is read: the weights are never
held twice, and nothing of transformers' modeling is imported. `check_weight_files` checks the files' headers
only, without torch, for the driver's start-up checks."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the driver checks weight files without importing torch (2 s, 140 MB)
    import torch

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses a longer header


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


def check_weight_files(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """ValueError naming the file unless every weight file of the checkpoint is there, its safetensors header
    reads and the file holds the bytes its header lists (a copy cut short fails here). Reads the headers only,
    and imports neither torch nor safetensors: the driver runs it at start-up, so that a missing or truncated
    file fails the job there, not in every worker once the cluster has started. Returns each tensor's shape,
    as the headers list them."""
    index = model_dir / INDEX_FILE
    single = model_dir / WEIGHTS_FILE
    if not single.exists() and not index.exists():
        raise ValueError(f"{model_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    files = [single] if single.exists() else sorted(set(weight_files(model_dir).values()))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}, named by {index}, does not exist")
        try:
            shapes.update(tensor_shapes(local_header(file)))
        except ValueError as e:
            raise ValueError(
                f"{file} is not a readable safetensors file ({e}): copy or download it again"
            ) from None
    return shapes


def local_header(file: Path) -> dict[str, Any]:
    """The header of the safetensors file `file` (see read_header)."""
    with file.open("rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return read_header(read, file.stat().st_size)


def read_header(read: Callable[[int, int], bytes], size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file of `size` bytes (an 8-byte length, then JSON naming each tensor's
    dtype, shape and byte range in the data that follows), read through `read(offset, length)`: a local file or
    ranged GETs of an object. ValueError saying what is wrong, also when the file is shorter than the byte
    ranges its header lists (a copy cut short)."""
    if size < 8:
        raise ValueError(f"{size} bytes, shorter than a header")
    (length,) = struct.unpack("<Q", read(0, 8))
    if length > size - 8:
        raise ValueError(f"its header claims {length} bytes; the file has {size}")
    # Not read: e.g. a pickled checkpoint renamed, whose first 8 bytes say anything.
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"its header claims {length} bytes, over safetensors' limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(read(8, length).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    entries = [entry for name, entry in header.items() if name != "__metadata__"]
    if not all(isinstance(entry, dict) and _is_ints(entry.get("data_offsets"), 2) for entry in entries):
        raise ValueError("its header lists tensors without byte offsets")
    if not all(_is_ints(entry.get("shape")) for entry in entries):
        raise ValueError("its header lists tensors without a shape")
    data = size - 8 - length
    end = max((entry["data_offsets"][1] for entry in entries), default=0)
    if end > data:
        raise ValueError(f"its tensors need {end} bytes of data; the file has {data}: it was cut short")
    return header


def _is_ints(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a header read_header returned."""
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    optional: Collection[str] = (),
) -> None:
    """ValueError naming the tensors unless every tensor in `expected` (but those in `optional`) is in `found`
    (a checkpoint's, from its headers) with the expected shape."""
    missing = sorted(set(expected) - set(found) - set(optional))
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensor(s) that config.json implies: {_some(missing)}"
        )
    wrong = [name for name, shape in sorted(expected.items()) if found.get(name, shape) != shape]
    if wrong:
        shown = [f"{name} is {list(found[name])}, not {list(expected[name])}" for name in wrong]
        raise ValueError(
            f"{len(wrong)} tensor(s) do not have the shape config.json implies ({_some(shown, 3)}): the "
            "weights and config.json are of different models"
        )


def _some(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def describe_missing(model_dir: Path, missing: Iterable[str]) -> str:
    missing = sorted(missing)
    return f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s): {_some(missing)}"


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
