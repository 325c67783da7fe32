"""Tiny models for tests: real transformers checkpoints built from tiny configs, and a scripted stand-in that
replays prescribed logits (to compare sampler decisions with transformers' on identical inputs)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.tiny import build_tiny_model


def build_checkpoint(
    out_dir: Path,
    *,
    sharpness: float = 1.0,
    canvas_length: int = 16,
    seed: int = 0,
    text_overrides: dict | None = None,
    generation_config: dict | None = None,
) -> Path:
    """A random tiny DiffusionGemma checkpoint. `sharpness` scales the final norm: > 1 makes predictions
    confident, so rows stop early and emit EOS, as a trained model does."""
    from transformers import DiffusionGemmaForBlockDiffusion

    path = build_tiny_model(
        out_dir,
        seed=seed,
        canvas_length=canvas_length,
        text_overrides=text_overrides,
        generation_config=generation_config,
    )
    if sharpness != 1.0:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path)
        with torch.no_grad():
            model.model.decoder.norm.weight.mul_(sharpness)
        model.save_pretrained(path)
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
