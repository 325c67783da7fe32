"""float32 -> a tensor's element dtype as the GPU rounds it (to nearest, ties to even), also in Triton's
interpreter, whose bfloat16 cast truncates: `to_elem(x, dtype, ROUND_BF16)` with ROUND_BF16 set for bfloat16
on the CPU. Kernels that must reproduce torch's roundings step by step use these."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), kept in float32: what the GPU's cast does, done by hand
    because the interpreter's cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


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
