"""Denoising-step update over [B, L] (acceptance, re-noising, stopping statistics).

`denoise_step(..., backend=...)` dispatches to the torch reference or the fused Triton kernel; both have the
semantics documented in reference.py.
"""

from __future__ import annotations

import torch

from pipeline.kernels.step.reference import StepOutput, entropy_bound_accept, step_reference


def denoise_step(
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
    backend: str = "torch",
) -> StepOutput:
    if backend == "triton" and frozen is None:
        from pipeline.kernels.step.triton_step import step_triton

        return step_triton(
            current,
            sampled,
            argmax,
            entropy,
            noise,
            history,
            entropy_bound=entropy_bound,
            confidence_threshold=confidence_threshold,
        )
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r} is not one of torch, triton")
    return step_reference(
        current,
        sampled,
        argmax,
        entropy,
        noise,
        history,
        entropy_bound=entropy_bound,
        confidence_threshold=confidence_threshold,
        frozen=frozen,
    )


__all__ = ["StepOutput", "denoise_step", "entropy_bound_accept", "step_reference"]
