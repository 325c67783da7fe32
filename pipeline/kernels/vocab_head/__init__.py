"""Fused vocabulary head: sampled token, argmax, entropy and self-conditioning input per position.

`vocab_head(..., backend=...)` dispatches to the pure-torch reference or the Triton kernel; both take and
return the same things (see reference.py for the semantics).
"""

from __future__ import annotations

import torch

from pipeline.kernels.vocab_head.reference import HeadOutput, softcap_logits, vocab_head_reference


def vocab_head(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    *,
    softcap: float | None,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None = None,
    want_soft: bool = False,
    backend: str = "torch",
) -> HeadOutput:
    _check_inputs(hidden, embedding, temperature, sample_state)
    if backend == "torch":
        return vocab_head_reference(
            hidden,
            embedding,
            softcap=softcap,
            temperature=temperature,
            sample_state=sample_state,
            want_soft=want_soft,
        )
    if backend == "triton":
        from pipeline.kernels.vocab_head.triton_head import vocab_head_triton

        return vocab_head_triton(
            hidden,
            embedding,
            softcap=softcap,
            temperature=temperature,
            sample_state=sample_state,
            want_soft=want_soft,
        )
    raise ValueError(f"backend={backend!r} is not one of torch, triton")


def _check_inputs(
    hidden: torch.Tensor,
    embedding: torch.Tensor,
    temperature: torch.Tensor,
    sample_state: torch.Tensor | None,
) -> None:
    if hidden.ndim != 2 or embedding.ndim != 2 or hidden.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and embedding [V, D] with the same D; got {tuple(hidden.shape)} and "
            f"{tuple(embedding.shape)}"
        )
    if temperature.shape != (hidden.shape[0],):
        raise ValueError(f"temperature must be [N]={hidden.shape[0]}; got {tuple(temperature.shape)}")
    if sample_state is not None and sample_state.shape != (hidden.shape[0],):
        raise ValueError(f"sample_state must be [N]={hidden.shape[0]}; got {tuple(sample_state.shape)}")


__all__ = ["HeadOutput", "softcap_logits", "vocab_head", "vocab_head_reference"]
