"""The keyed counter-based generator of `pipeline.kernels.rng`, as `@triton.jit` helpers on uint32 words.

`mix32`, `absorb` and the word of `gumbel` equal the torch definitions bit for bit; the Gumbel float equals
torch's to the last bit where both use the same `logf` (CUDA: libdevice, as torch), else (the interpreter
against torch on CPU) within two units in the last place of max(1, |noise|). `gumbel_estimate` is a cheap
approximation (two hardware log2) for deciding where the exact noise is needed. CUDA=True: compiled for a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice  # dispatches to the backend; the interpreter cannot call it

# gumbel_estimate(h) is within this of gumbel(h) for every word (tests/kernels/test_rng.py checks all 2**23
# inputs; measured: 1e-6 in the interpreter). Kernels that filter with it keep a margin well above it.
GUMBEL_ESTIMATE_ERROR = tl.constexpr(2.0**-13)
_LN2 = tl.constexpr(0.6931471805599453)
_GOLDEN = tl.constexpr(0x9E3779B9)
_MIX_C1 = tl.constexpr(0x7FEB352D)
_MIX_C2 = tl.constexpr(0x846CA68B)


@triton.jit
def mix32(x):
    """lowbias32 of uint32 words `x` (multiplication wraps modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * _MIX_C1
    x = x ^ (x >> 15)
    x = x * _MIX_C2
    return x ^ (x >> 16)


@triton.jit
def absorb(h, w):
    """mix32(h ^ w ^ 0x9e3779b9) for uint32 `h` and `w`."""
    return mix32(h ^ w ^ _GOLDEN)


@triton.jit
def _log(x, CUDA: tl.constexpr):
    """Natural log in float32: libdevice `logf` (what torch calls on CUDA) or `tl.log` (interpreter)."""
    if CUDA:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def gumbel(h, CUDA: tl.constexpr):
    """Gumbel(0, 1) float32 noise from uint32 words `h` = absorb(position state, vocabulary id).

    u = ((h >> 9) + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1), so the noise is
    finite: within [-2.82, 16.64].
    """
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -_log(-_log(u, CUDA), CUDA)


@triton.jit
def _log2_fast(x, CUDA: tl.constexpr):
    if CUDA:
        return libdevice.fast_log2f(x)  # lg2.approx: absolute error about 2**-22
    else:
        return tl.log2(x)


@triton.jit
def gumbel_estimate(h, CUDA: tl.constexpr):
    """gumbel(h) within GUMBEL_ESTIMATE_ERROR, for a fraction of its cost.

    -log(u) is a series in w = 1 - u (exact in float32) where u is near 1, so that the outer log sees a
    relative error of at most ~1e-5 from the inner hardware log2.
    """
    m = (h >> 9).to(tl.float32)
    u = (m + 0.5) * (1.0 / 8388608.0)
    w = (8388607.5 - m) * (1.0 / 8388608.0)
    series = w * (1.0 + w * (0.5 + w * (0.3333333333 + w * (0.25 + w * 0.2))))  # -log(1 - w), w < 1/32
    neg_log_u = tl.where(w < 0.03125, series, -_log2_fast(u, CUDA) * _LN2)
    return -_log2_fast(neg_log_u, CUDA) * _LN2
