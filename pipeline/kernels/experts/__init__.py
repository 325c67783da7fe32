"""The grouped mixture of experts' elementwise pieces: `gelu_mul` and `combine` dispatch to the torch reference
or the fused Triton kernels by `backend` (see reference.py for the semantics)."""

from __future__ import annotations

import torch

from pipeline.kernels.experts import reference


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    """gelu_tanh(gate) * up for gate, up [M, I] (views of one [M, 2I] product are fine)."""
    if gate.shape != up.shape or gate.ndim != 2 or gate.dtype != up.dtype:
        raise ValueError(
            f"gate and up must be [M, I] alike; got {gate.dtype} {tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}"
        )
    if backend == "torch":
        return reference.gelu_mul(gate, up)
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not one of torch, triton")
    if gate.stride(1) != 1 or up.stride(1) != 1 or gate.stride(0) != up.stride(0):
        raise ValueError(
            f"gate and up need unit column strides and one row stride; got {gate.stride()}, {up.stride()}"
        )
    from pipeline.kernels.experts.triton_experts import gelu_mul_triton

    return gelu_mul_triton(gate, up)


def combine(
    ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor, *, backend: str = "torch"
) -> torch.Tensor:
    """[N, D]: token n's k expert outputs ys[inverse[n * k + j]] weighted by weights[n, j] and summed."""
    num, top_k = weights.shape
    if ys.ndim != 2 or ys.shape[0] != num * top_k or inverse.shape != (num * top_k,):
        raise ValueError(
            f"ys must be [N*k, D] and inverse [N*k] for weights [N, k]={tuple(weights.shape)}; got "
            f"{tuple(ys.shape)} and {tuple(inverse.shape)}"
        )
    if inverse.dtype != torch.int64:
        raise ValueError(f"inverse must be int64 (row offsets of ys); got {inverse.dtype}")
    if backend == "torch":
        return reference.combine(ys, inverse, weights)
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not one of torch, triton")
    from pipeline.kernels.experts.triton_experts import combine_triton

    return combine_triton(ys.contiguous(), inverse.contiguous(), weights.float().contiguous())


__all__ = ["combine", "gelu_mul"]
