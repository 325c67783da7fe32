"""DiffusionGemma's training objective on a batch of (clean prompt, clean canvas) pairs.

  1. per example a re-noising rate r ~ U(noise_floor, 1); each canvas position is independently replaced by
     a token drawn uniformly from the whole vocabulary with probability r (the sampler's noise: uniform over
     vocab_size ids, so the model learns to distrust any token, including ids the tokenizer never emits);
  2. a random subset of examples (probability self_conditioning_prob each) gets self-conditioning: a first
     no-grad pass over the same noisy canvas (with no self-conditioning) gives logits z, and the second pass
     receives z / T with T ~ U(sc_t_min, sc_t_max) per example. The sampler feeds softmax(z_prev / T_step)
     at inference with T on the t_max -> t_min schedule, so the training signal has the same sharpness;
  3. cross-entropy of the second pass's (soft-capped) logits against the clean canvas, averaged over every
     canvas position (answer, <eos> and <pad> alike).

Every random draw comes from the `generator` argument, in a fixed order, so a step is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ObjectiveSettings:
    vocab_size: int
    noise_floor: float = 0.05
    self_conditioning_prob: float = 0.5
    sc_t_min: float = 0.4
    sc_t_max: float = 0.8


@dataclass
class NoisyCanvas:
    canvas: torch.Tensor  # [B, L] int64 model input
    replaced: torch.Tensor  # [B, L] bool, positions that were re-noised
    rate: torch.Tensor  # [B] float32


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with grad
    logits: torch.Tensor  # [B, L, V] float32 (detached)
    noisy: NoisyCanvas
    sc_mask: torch.Tensor  # [B] bool


def renoise(
    target: torch.Tensor, rate: torch.Tensor, vocab_size: int, generator: torch.Generator
) -> NoisyCanvas:
    """Replaces each position of `target` [B, L] with a uniform token with probability rate[b]."""
    batch, length = target.shape
    if rate.shape != (batch,):
        raise ValueError(f"rate must be [B]={batch}; got {tuple(rate.shape)}")
    replaced = torch.rand(batch, length, generator=generator) < rate[:, None]  # [B, L]
    noise = torch.randint(0, vocab_size, (batch, length), generator=generator)  # [B, L]
    return NoisyCanvas(canvas=torch.where(replaced, noise, target), replaced=replaced, rate=rate)


def diffusion_loss(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    target: torch.Tensor,
    settings: ObjectiveSettings,
    generator: torch.Generator,
) -> LossOutput:
    """prompt_ids [B, P] (one length, no padding), target [B, L] -> the self-conditioned diffusion loss.

    `model` is transformers' DiffusionGemmaForBlockDiffusion; with unpadded prompts its default positions
    (prompt 0..P-1, canvas P..P+L-1) are the sampler's.
    """
    batch = target.shape[0]
    # All draws happen unconditionally and in this order, whatever the branches below do.
    rate = settings.noise_floor + (1.0 - settings.noise_floor) * torch.rand(batch, generator=generator)
    noisy = renoise(target, rate, settings.vocab_size, generator)
    sc_mask = torch.rand(batch, generator=generator) < settings.self_conditioning_prob  # [B]
    temperature = settings.sc_t_min + (settings.sc_t_max - settings.sc_t_min) * torch.rand(
        batch, generator=generator
    )  # [B]

    sc_logits = None
    if bool(sc_mask.any()):
        rows = sc_mask.nonzero().squeeze(1)
        with torch.no_grad():  # the first pass only on the examples that use it
            first = model(
                input_ids=prompt_ids[rows], decoder_input_ids=noisy.canvas[rows]
            ).logits  # [S, L, V]
        sc_logits = torch.zeros(batch, *first.shape[1:], dtype=first.dtype)  # [B, L, V]
        sc_logits[rows] = first / temperature[rows, None, None]
    out = model(
        input_ids=prompt_ids,
        decoder_input_ids=noisy.canvas,
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_mask if sc_logits is not None else None,
    )
    logits = out.logits  # [B, L, V] float32, soft-capped
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return LossOutput(loss=loss, logits=logits.detach(), noisy=noisy, sc_mask=sc_mask)
