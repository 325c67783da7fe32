"""Pure-torch denoising-step update over [B, L]: entropy-bound acceptance, uniform re-noising, the
stable-and-confident statistics. The same operations, in the same order, as transformers'
`EntropyBoundSampler` and `StableAndConfidentStoppingCriteria`.

  accepted  = the lowest-entropy positions whose entropy sum minus its largest term is <= entropy_bound
              (computed as cumsum(sorted) - sorted <= bound, exactly as the reference; always >= 1)
  canvas    = accepted ? sampled : noise          (noise: fresh uniform tokens)
  stable    = argmax equals each of the last `stability_threshold` argmax canvases (always, when 0)
  confident = mean entropy < confidence_threshold

With `frozen` (the no-revision ablation), positions accepted earlier in the canvas keep their token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    canvas: torch.Tensor  # [B, L] next input canvas
    accepted: torch.Tensor  # [B, L] bool
    stable: torch.Tensor  # [B] bool
    confident: torch.Tensor  # [B] bool
    history: torch.Tensor  # [B, S, L] argmax history after this step (S = stability_threshold)
    frozen: torch.Tensor | None = None  # [B, L] bool, when the ablation is on


def entropy_bound_accept(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    # The same call as transformers (its default, unstable sort), so that which of several exactly tied
    # positions is accepted also matches it on the same device. Fused kernels may order ties by position.
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    selected = cumulative - sorted_entropy <= entropy_bound
    return torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)


def step_reference(
    current: torch.Tensor,
    sampled: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    noise: torch.Tensor,
    history: torch.Tensor,
    *,
    entropy_bound: float,
    confidence_threshold: float,
    frozen: torch.Tensor | None = None,
) -> StepOutput:
    """current/sampled/argmax/noise [B, L] int64, entropy [B, L] float32, history [B, S, L] int64."""
    accepted = entropy_bound_accept(entropy, entropy_bound)
    canvas = torch.where(accepted, sampled, noise)
    if frozen is not None:
        canvas = torch.where(frozen, current, canvas)
        frozen = frozen | accepted
    if history.shape[1] == 0:
        stable = torch.ones(current.shape[0], dtype=torch.bool, device=current.device)
        new_history = history
    else:
        stable = (history == argmax[:, None, :]).all(dim=-1).all(dim=-1)
        new_history = torch.cat([history[:, 1:], argmax[:, None, :]], dim=1)
    confident = torch.mean(entropy, dim=-1) < confidence_threshold
    return StepOutput(
        canvas=canvas,
        accepted=accepted,
        stable=stable,
        confident=confident,
        history=new_history,
        frozen=frozen,
    )
