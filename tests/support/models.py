"""Tiny models for tests: real transformers checkpoints built from tiny configs, and a scripted stand-in that
replays prescribed logits (to compare sampler decisions with transformers' on identical inputs)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.models.tiny import build_tiny_model

# Every scale of DiffusionGemma's text model that transformers initialises to 1: the RMS norms' weights, the
# router's input scale and per-expert scale, the layer scalar (a buffer). Left at 1, a forward that reads the
# wrong one (the pre-feedforward norm's weight for the experts' norm, say) or none computes the same numbers.
LAYER_SCALES = (
    "input_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "pre_feedforward_layernorm_2.weight",
    "router.scale",
    "router.per_expert_scale",
    "post_feedforward_layernorm_1.weight",
    "post_feedforward_layernorm_2.weight",
    "post_feedforward_layernorm.weight",
    "layer_scalar",
)
MODEL_SCALES = ("norm.weight", "self_conditioning.pre_norm.weight")
DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."  # shares the decoder's weights; its layer scalars are own buffers


def randomize_scales(state: dict[str, torch.Tensor], *, seed: int, spread: float = 0.2) -> int:
    """Multiplies each element of every text-model scale in `state` (a DiffusionGemmaForBlockDiffusion state
    dict, the model's own tensors or a checkpoint's) by its own factor, uniform in [1 - spread, 1 + spread]
    (drawn from `seed`), in place. The encoder's tied copies get the decoder's values; its layer scalars, which
    transformers does not tie (buffers), get values of their own, so that a model using the decoder's for the
    encoder is caught. Returns how many decoder tensors it changed. Any of the scales missing is an error, so
    that a renaming in transformers cannot leave them at 1 unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    layers = sorted({int(m[1]) for k in state if (m := re.match(rf"{re.escape(DECODER)}layers\.(\d+)\.", k))})
    names = [DECODER + n for n in MODEL_SCALES]
    names += [f"{DECODER}layers.{i}.{n}" for i in layers for n in LAYER_SCALES]
    missing = [n for n in names if n not in state]
    if not layers or missing:
        raise KeyError(f"scales missing from the state dict: {missing or 'no decoder layers'}")
    for name in names:
        t = state[name]
        factor = torch.empty(t.shape, dtype=torch.float32).uniform_(1 - spread, 1 + spread, generator=gen)
        with torch.no_grad():
            t.copy_(t.float() * factor.to(t.device))
    scales = set(names)
    for key, t in sorted(state.items()):
        twin = DECODER + key[len(ENCODER) :]
        if key.startswith(ENCODER) and twin in scales and t.data_ptr() != state[twin].data_ptr():
            with torch.no_grad():
                if key.endswith(".layer_scalar"):
                    factor = torch.empty(t.shape).uniform_(1 - spread, 1 + spread, generator=gen)
                    t.copy_(t.float() * factor.to(t.device))
                else:
                    t.copy_(state[twin])
    return len(names)


def build_checkpoint(
    out_dir: Path,
    *,
    sharpness: float = 1.0,
    canvas_length: int = 16,
    seed: int = 0,
    text_overrides: dict | None = None,
    generation_config: dict | None = None,
    random_scales: bool = True,
) -> Path:
    """A random tiny DiffusionGemma checkpoint. Its norm weights, router scales and layer scalars are random
    too (`random_scales`, randomize_scales), unlike those of a freshly initialised model (all 1). `sharpness`
    scales the final norm: > 1 makes predictions confident, so rows stop early and emit EOS, as a trained
    model does."""
    from safetensors.torch import load_file, save_file

    path = build_tiny_model(
        out_dir,
        seed=seed,
        canvas_length=canvas_length,
        text_overrides=text_overrides,
        generation_config=generation_config,
    )
    if random_scales or sharpness != 1.0:
        weights = path / "model.safetensors"
        state = load_file(weights)
        if random_scales:
            randomize_scales(state, seed=seed)
        state[DECODER + "norm.weight"].mul_(sharpness)  # the encoder's final norm is tied to it
        save_file(state, weights.with_suffix(".tmp"), metadata={"format": "pt"})
        weights.with_suffix(".tmp").replace(weights)
    return path


class _Cache:
    def __init__(self, slots: int) -> None:
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.slots = slots

    def move(self, src: int, dst: int) -> None:
        self.lengths[dst] = self.lengths[src]

    def nbytes(self) -> int:
        return 0


class ScriptedModel:
    """Stands in for DiffusionGemmaTextModel: `denoise` returns the next prescribed logits as hidden states
    with an identity embedding and no soft-capping, so the sampler's logits are exactly the script's."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        self.script = list(logits)
        self.calls = 0
        vocab = logits[0].shape[-1]
        self.vocab_size = vocab
        self.hidden_size = vocab
        self.embedding = torch.eye(vocab)
        self.softcap = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.canvases_seen: list[torch.Tensor] = []

    def new_cache(self, slots: int, capacity: int) -> _Cache:
        return _Cache(slots)

    def encode(self, cache, slots, tokens, lengths, *, prefix=False, kv_limit=None) -> None:
        cache.lengths[slots] += lengths

    def denoise(self, cache, slots, canvas, soft_embeddings, *, prefix=False, kv_limit=None) -> torch.Tensor:
        self.canvases_seen.append(canvas.clone())
        logits = self.script[self.calls]
        self.calls += 1
        return logits[: canvas.shape[0]].clone()


def load_shipped(builtin: str, asset: str):
    """Yields a shipped trained model (pipeline/assets/<asset>) loaded through the normal loader on the CPU,
    with one torch thread while it is in use (for module-scoped fixtures)."""
    from pipeline.models.loader import ASSETS, load_model

    assert (ASSETS / asset / "model.safetensors").exists(), f"the trained model {asset} is not shipped"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(builtin, device="cpu")
    finally:
        torch.set_num_threads(threads)


def sampler_settings(length: int, **overrides):
    """Sampler settings for the tiny test checkpoints (build_checkpoint) of canvas `length`: EOS 1, pad 0,
    4 canvases, 12 steps; `overrides` (canvas_length too) replace any of them."""
    from pipeline.sampler.settings import SamplerSettings

    values = dict(
        max_new_tokens=4 * length,
        max_denoising_steps=12,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.3,
        stability_threshold=1,
        confidence_threshold=0.3,
        canvas_length=length,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    values.update(overrides)
    return SamplerSettings(**values)
