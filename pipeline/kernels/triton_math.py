"""float32 helpers shared by the kernels, the same on the GPU and in Triton's interpreter:

- `to_elem` / `rounded`: float32 -> a tensor's element dtype as the GPU rounds it (to nearest, ties to even),
  also in the interpreter, whose bfloat16 cast truncates (ROUND_BF16 set for bfloat16 on the CPU). Kernels
  that reproduce torch's roundings step by step use these.
- `tanh`: libdevice's tanhf (what torch calls on CUDA) compiled, a Cephes-style float32 tanh interpreted.
- `device_flags`: the CUDA / ROUND_BF16 constants a launcher passes for its tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.rng_triton import libdevice


@triton.jit
def tanh(x, CUDA: tl.constexpr):
    if CUDA:
        return libdevice.tanh(x)
    else:
        # The interpreter has no libdevice: Cephes tanhf (odd polynomial below 0.625, else via exp), ~2 ulp.
        a = tl.abs(x)
        s = x * x
        poly = (
            (((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
            - 3.33332819422e-1
        ) * s * x + x
        big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        big = tl.where(x < 0.0, -big, big)
        return tl.where(a < 0.625, poly, big)


@triton.jit
def round_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), kept in float32: what the GPU's cast does, done by hand
    because the interpreter's cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN stays NaN (not inf)


@triton.jit
def to_elem(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """float32 x rounded to `dtype`, as torch's x.to(dtype)."""
    if ROUND_BF16:
        return round_bf16(x).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def rounded(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """float32 x rounded to `dtype` and back: the value torch holds after storing x in a `dtype` tensor."""
    return to_elem(x, dtype, ROUND_BF16).to(tl.float32)


def device_flags(x: torch.Tensor) -> dict[str, bool]:
    """CUDA: compiled for a GPU (any device but the CPU, whose kernels run in the interpreter; meta tensors
    count as a GPU, so that pipeline.kernels.aot can record launches without one). ROUND_BF16: bfloat16
    rounded by hand, where the interpreter's cast would truncate."""
    cuda = x.device.type != "cpu"
    return {"CUDA": cuda, "ROUND_BF16": x.dtype == torch.bfloat16 and not cuda}
