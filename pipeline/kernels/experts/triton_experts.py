"""Fused pieces of the grouped mixture of experts (Triton), with the semantics of reference.py.

- `_gelu_mul_kernel`: gelu_tanh(gate) * up from the [M, 2I] gate/up product in one pass (transformers: a
  gelu pass and a product pass over [M, I], each written out).
- `_combine_kernel`: each token's k expert outputs weighted and summed in float32, one program per token and
  block of D: reads every expert output once and writes [N, D] once, with no atomics (so deterministic),
  where the unfused path multiplies [N*k, D] by the weights (a read and a write of N*k*D) and then
  scatter-adds it with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.triton_math import device_flags, rounded, tanh, to_elem

COMBINE_BLOCK = 1024
GELU_BLOCK = 1024
_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _gelu_mul_kernel(
    gate_ptr,  # [M, I] rows `stride` apart
    up_ptr,  # [M, I] rows `stride` apart
    out_ptr,  # [M, I] contiguous
    width,
    stride,
    CUDA: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # a 2D grid (rows x blocks of a row): no per-element division
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    inner = _BETA * (g + _KAPPA * (g * g * g))  # torch's gelu(approximate="tanh"), float32 inside
    act = rounded(0.5 * g * (1.0 + tanh(inner, CUDA)), dtype, ROUND_BF16)
    tl.store(out_ptr + row * width + cols, to_elem(act * u, dtype, ROUND_BF16), mask=mask)


@triton.jit
def _combine_kernel(
    ys_ptr,  # [N*k, D] expert outputs, grouped by expert
    inverse_ptr,  # [N*k] int64: row of ys holding token n's j-th assignment, at n * k + j
    weight_ptr,  # [N, k] float32
    out_ptr,  # [N, D]
    width,
    TOP_K: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < width
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(inverse_ptr + token * TOP_K + j)
        w = tl.load(weight_ptr + token * TOP_K + j)
        acc += w * tl.load(ys_ptr + row * width + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * width + offs, to_elem(acc, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def gelu_mul_triton(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate, up [M, I] with unit column stride and one row stride (views of a [M, 2I] product qualify)."""
    rows, width = gate.shape
    if out is None:
        out = torch.empty(rows, width, dtype=gate.dtype, device=gate.device)
    if rows and width:
        block = min(GELU_BLOCK, triton.next_power_of_2(width))
        _gelu_mul_kernel[(rows, triton.cdiv(width, block))](
            gate,
            up,
            out,
            width,
            gate.stride(0),
            **device_flags(gate),
            BLOCK=block,
            num_warps=max(1, block // 256),
        )
    return out


def combine_triton(
    ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ys [N*k, D] contiguous, inverse [N*k] int64, weights [N, k] float32 -> [N, D] in ys' dtype."""
    num, top_k = weights.shape
    width = ys.shape[1]
    if out is None:
        out = torch.empty(num, width, dtype=ys.dtype, device=ys.device)
    if num and width:
        block = min(COMBINE_BLOCK, triton.next_power_of_2(width))
        _combine_kernel[(num, triton.cdiv(width, block))](
            ys, inverse, weights, out, width,
            TOP_K=top_k, ROUND_BF16=device_flags(ys)["ROUND_BF16"], BLOCK_D=block, num_warps=4,
        )  # fmt: skip
    return out
