"""Loads a DiffusionGemma checkpoint (Hugging Face layout) into the sampler's text model without transformers'
modeling code: config.json read by gemma_config (transformers' defaults and per-layer settings), the weights
with safetensors into gemma_layers' modules, built on the meta device.

What is read: the decoder's text weights (`model.decoder.*`) and the encoder's per-layer scalars (buffers,
which transformers does not tie; a checkpoint must hold them). The encoder's other text weights and the head
(`lm_head.weight`), where a checkpoint holds them, must equal the decoder's: canvasflow runs the tied layout
(diffusion_gemma._check_tied says why), and refuses a checkpoint that would compute another function. The
vision tower is not read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.models.diffusion_gemma import TIED_MESSAGE, TextWeights
from pipeline.models.gemma_config import GemmaConfig, parse_config
from pipeline.models.gemma_layers import TextDecoder
from pipeline.models.weights import describe_missing, read_tensors, weight_files

logger = logging.getLogger(__name__)

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
HEAD = "lm_head.weight"
SCALAR = "layer_scalar"  # a buffer: transformers builds the decoder's as 1 where a checkpoint lacks it


def read_config(model_dir: str | Path) -> GemmaConfig:
    """The checkpoint's config.json (ValueError naming the file when it is not a DiffusionGemma config)."""
    from pipeline.models.loader import read_config_json

    path = Path(model_dir) / "config.json"
    config = read_config_json(path)  # a ModelError naming the file if it is not a JSON object
    try:
        return parse_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_text_weights(
    model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TextWeights:
    """The text weights of the checkpoint in `model_dir`, in `dtype` on `device`. ValueError (naming the
    tensor) for a missing tensor, a shape the config does not imply, or untied weights."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    text = config.text_config
    decoder = _meta_decoder(config)
    shapes = {DECODER + name: t.shape for name, t in decoder.state_dict().items()}
    files = weight_files(model_dir)
    absent_scalars = {n for n in shapes if n.endswith(SCALAR) and n not in files}
    missing = set(shapes) - set(files) - absent_scalars
    if missing:
        raise ValueError(describe_missing(model_dir, missing))
    state = read_tensors(
        model_dir, files, {n: s for n, s in shapes.items() if n in files}, dtype=dtype, device=device
    )
    for name in absent_scalars:
        logger.warning(
            "%s: no %s in the checkpoint; using 1, the value transformers gives it", model_dir, name
        )
        state[name] = torch.ones(1, dtype=dtype, device=device)
    decoder.load_state_dict({n[len(DECODER) :]: t for n, t in state.items()}, assign=True, strict=True)
    decoder.init_buffers(dtype, device)
    _check_tied(model_dir, config, files, state, dtype)
    # The encoder's scalars are its own (buffers are not tied). transformers leaves a missing one uninitialised
    # (any value), so a checkpoint without them has no defined encoder: refused.
    names = _encoder_scalars(len(decoder.layers))
    if set(names) - set(files):
        raise ValueError(describe_missing(model_dir, set(names) - set(files)))
    encoder_scalars = read_tensors(
        model_dir, files, dict.fromkeys(names, torch.Size([1])), dtype=dtype, device=device
    )
    return TextWeights(
        decoder=decoder.eval().requires_grad_(False),
        text_config=text,
        canvas_length=int(config.canvas_length),
        encoder_layer_scalars=torch.stack([encoder_scalars[n] for n in names]),
    )


def checkpoint_shapes(model_dir: str | Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """What load_text_weights reads or compares, from config.json alone (the model built on the meta device,
    nothing allocated): each tensor's shape, and the names a checkpoint may lack (the decoder's scalars, and
    with tied weights the encoder's text weights and the head)."""
    config = read_config(model_dir)
    decoder = _meta_decoder(config)
    shapes = {DECODER + name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    optional = {n for n in shapes if n.endswith(SCALAR)}
    twins = _twins(shapes)
    shapes.update({key: shapes[twin] for key, twin in twins.items()})
    if config.tie_word_embeddings:
        optional |= set(twins)
    shapes.update(dict.fromkeys(_encoder_scalars(len(decoder.layers)), (1,)))
    return shapes, optional


def _meta_decoder(config: GemmaConfig) -> TextDecoder:
    with torch.device("meta"):
        return TextDecoder(config.text_config)


def _encoder_scalars(num_layers: int) -> list[str]:
    return [f"{ENCODER}layers.{i}.{SCALAR}" for i in range(num_layers)]


def _twins(decoder_names: Iterable[str]) -> dict[str, str]:
    """Tensor name -> the decoder tensor it is tied to: the head, the encoder's embedding and its layers' text
    weights (not its final norm, whose output is never used)."""
    embedding = DECODER + "embed_tokens.weight"
    twins = {HEAD: embedding, ENCODER + "embed_tokens.weight": embedding}
    for name in decoder_names:
        rest = name[len(DECODER) :]
        if rest.startswith("layers.") and not rest.endswith(SCALAR):
            twins[ENCODER + rest] = name
    return twins


def _check_tied(
    model_dir: Path,
    config: GemmaConfig,
    files: dict[str, Path],
    decoder: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Every encoder text weight and the head that the checkpoint holds equals the decoder's tensor it is tied
    to (compared in the model's dtype, as transformers would have loaded both). With tie_word_embeddings=False
    transformers keeps them apart, so there they must be in the checkpoint: one absent would be random."""
    twins = _twins(decoder)
    untied = not config.tie_word_embeddings  # transformers ties by the top-level flag
    if untied:
        absent = [k for k in twins if k not in files]
        if absent:
            raise ValueError(
                f"{model_dir}: tie_word_embeddings=False, and the checkpoint lacks {absent[0]} "
                f"({len(absent)} such): transformers would initialise it at random. {TIED_MESSAGE}"
            )
    present = {k: twin for k, twin in twins.items() if k in files}
    for key, twin in present.items():
        theirs = decoder[twin]
        ours = read_tensors(model_dir, files, {key: theirs.shape}, dtype=dtype, device=theirs.device)[key]
        if not torch.equal(ours, theirs):
            raise ValueError(f"{key} differs from the decoder's weight: {TIED_MESSAGE}")
