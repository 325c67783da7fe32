"""LLaDA's training objective (masked diffusion, SFT form) on a batch of (clean prompt, clean answer) pairs.

  1. per example a masking ratio t ~ U(0, 1), used as p = (1 - eps) t + eps (LLaDA's forward process);
     `stratified=True` draws the batch's t as (u + i / B) mod 1 (one u per batch): each t is still U(0, 1),
     so the loss keeps its expectation, with far less variance from the 1/p weights at small batch sizes;
  2. each answer position (answer, EOS and EOS padding alike, as LLaDA's SFT) becomes MASK with probability p;
     the prompt is never masked;
  3. the model reads prompt + noisy answer bidirectionally; the loss is the cross-entropy of the clean token
     at every masked position, weighted 1/p, summed and divided by the answer length and the batch size:
     an upper bound of the answer's negative log-likelihood.

Every random draw comes from the `generator` argument, in a fixed order, so a step is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.models.bidirectional import BidirectionalLM


@dataclass
class MaskLossOutput:
    loss: torch.Tensor  # scalar, with grad
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B]
    accuracy: float  # argmax accuracy at masked positions (monitoring)


def masked_diffusion_loss(
    model: BidirectionalLM,
    prompt_ids: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
    *,
    eps: float = 1e-3,
    stratified: bool = False,
) -> MaskLossOutput:
    """prompt_ids [B, P] (one prompt length), target [B, L] the clean answer region."""
    batch, length = target.shape
    prompt_len = prompt_ids.shape[1]
    if stratified:
        t = (torch.rand(1, generator=generator) + torch.arange(batch) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator)
    p_mask = (1 - eps) * t + eps  # [B]
    masked = torch.rand(batch, length, generator=generator) < p_mask[:, None]  # [B, L]
    noisy = torch.where(masked, model.mask_token_id, target)
    tokens = torch.cat([prompt_ids, noisy], dim=1)  # [B, P + L]
    positions = torch.arange(tokens.shape[1]).expand(batch, -1)
    hidden = model(tokens, positions, torch.ones_like(tokens, dtype=torch.bool))
    shift = 1 if model.spec.shift_logits else 0  # Dream reads position p's logits at p - 1
    logits = model.logits(hidden[:, prompt_len - shift : prompt_len + length - shift])  # [B, L, V]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    weighted = token_loss.view(batch, length) * masked / p_mask[:, None]
    loss = weighted.sum() / (batch * length)
    with torch.no_grad():
        hits = (logits.argmax(-1) == target) & masked
        accuracy = float(hits.sum() / masked.sum().clamp_min(1))
    return MaskLossOutput(loss=loss, masked=masked, p_mask=p_mask, accuracy=accuracy)
