"""The grouped mixture of experts' pieces: `expert_gemm` (the grouped products, with the row gather and the
gelu x up fused on the Triton backend), `gelu_mul` and `combine` dispatch to the torch reference or the Triton
kernels by `backend` (see reference.py for the semantics)."""

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


def expert_gemm(
    x: torch.Tensor,
    rows: torch.Tensor | None,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    *,
    gelu: bool,
    backend: str = "torch",
) -> torch.Tensor:
    """Rows x[rows] (x itself when rows is None), sorted by expert, times their experts' weight [E, OUT, K]
    transposed; offsets [E] int32: each expert's end row. -> [M, OUT], or with `gelu` gelu_tanh(gate) * up of
    the product's halves, [M, OUT / 2]."""
    if x.ndim != 2 or weight.ndim != 3 or weight.shape[2] != x.shape[1] or x.dtype != weight.dtype:
        raise ValueError(
            f"x must be [N, K] and weight [E, OUT, K] of one dtype; got {x.dtype} {tuple(x.shape)} and "
            f"{weight.dtype} {tuple(weight.shape)}"
        )
    if offsets.shape != (weight.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets must be int32 [E]={weight.shape[0]}; got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if rows is not None and (rows.ndim != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [M]; got {rows.dtype} {tuple(rows.shape)}")
    if gelu and weight.shape[1] % 2:
        raise ValueError(f"gelu needs an even number of output features [gate | up]; got {weight.shape[1]}")
    if backend == "torch":
        return reference.expert_gemm(x, rows, weight, offsets, gelu=gelu)
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not one of torch, triton")
    if x.stride(1) != 1 or weight.stride(2) != 1:
        raise ValueError(f"x and weight need a unit last stride; got {x.stride()} and {weight.stride()}")
    from pipeline.kernels.experts.triton_gemm import expert_gemm_triton

    return expert_gemm_triton(x, rows, weight, offsets.contiguous(), gelu=gelu)


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


__all__ = ["combine", "expert_gemm", "gelu_mul"]
