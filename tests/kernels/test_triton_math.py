"""The interpreter's bfloat16 rounding: round_bf16's Triton body, the numpy one the test shim runs instead
(tests/support/triton_interpreter.py) and torch's cast agree bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from pipeline.kernels.triton_math import round_bf16
from tests.support import triton_interpreter

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="round_bf16 runs only in Triton's interpreter"
)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, round_bf16(tl.load(x_ptr + offsets, mask=mask)), mask=mask)


def _values() -> torch.Tensor:
    """Every kind of float32 the rounding treats apart: ties to even and odd on both sides of a bfloat16,
    values that round up into the next binade and into infinity, subnormals, zeros, infinities, NaNs (one
    whose payload would carry into the sign), and random bit patterns."""
    special = np.array(
        [
            0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties (to even 1.0, up to 1.0156) and neighbours
            0x3FFF8000, 0x3FFFFFFF,  # round up into the next binade
            0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,  # to infinity, and the largest finite bfloat16
            0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # subnormals
            0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
            0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001,  # NaNs
        ],
        dtype=np.uint32,
    )  # fmt: skip
    random = np.random.default_rng(0).integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
    return torch.from_numpy(np.concatenate([special, random]).view(np.float32).copy())


def _run(x: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def test_the_numpy_rounding_equals_the_interpreted_body_and_torch():
    from triton.runtime.interpreter import InterpretedFunction

    x = _values()
    native = triton_interpreter.native_functions()
    cache = InterpretedFunction.rewritten_fn
    assert cache.get(round_bf16.fn) is native[round_bf16.fn], "the shim is not installed"
    shimmed = _run(x)
    del cache[round_bf16.fn]  # the Triton body, rewritten and interpreted op by op
    try:
        interpreted = _run(x)
    finally:
        cache[round_bf16.fn] = native[round_bf16.fn]
    bits = {name: t.view(torch.int32) for name, t in (("numpy", shimmed), ("interpreted", interpreted))}
    assert torch.equal(bits["numpy"], bits["interpreted"])
    nan = x.isnan()
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(shimmed[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert shimmed[nan].isnan().all()
