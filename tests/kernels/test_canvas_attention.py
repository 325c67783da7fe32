"""The canvas attention kernel against the reference (scaled_dot_product_attention with a mask) and against
float64 truth: odd shapes on any device (the interpreter on CPU), DiffusionGemma-26B-A4B's on a GPU, the output
poisoned with NaN first.

Tolerances: float32 within 1e-5 (+1e-5 relative) of the reference; bf16 no further from the float64 truth
than the reference's bf16 math path is (x 1.5, + 1e-3): the kernel keeps scores in float32 and rounds only
the probabilities, where the math path rounds scores and probabilities.
"""

import pytest
import torch

from pipeline.kernels.attention import (
    canvas_attention,
    canvas_attention_reference,
    causal_attention,
    causal_attention_reference,
)
from pipeline.kernels.attention.triton_attention import canvas_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# (batch, tokens, heads, kv_heads, head_dim, slots, capacity): tokens not a multiple of BLOCK_M, head_dim not a
# power of two, one or several query heads per key/value head, scattered slots.
SHAPES = {
    "B3-T20-H4/2-d24": (3, 20, 4, 2, 24, 5, 70),
    "B2-T7-H4/1-d40": (2, 7, 4, 1, 40, 3, 33),
    "B2-T70-H2/2-d32": (2, 70, 2, 2, 32, 2, 200),
}


def _inputs(shape, dtype, seed):
    batch, tokens, heads, kv_heads, dim, slots, capacity = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, dim, generator=g)
    keys = torch.randn(slots, kv_heads, capacity, dim, generator=g)
    values = torch.randn(slots, kv_heads, capacity, dim, generator=g)
    slot = torch.randperm(slots, generator=g)[:batch]
    hi = torch.randint(tokens, capacity + 1, (batch,), generator=g)
    lo = hi - tokens - torch.randint(0, 40, (batch,), generator=g)  # some below 0 (a short prefix, sliding)
    to = dict(device=DEVICE)
    return (
        q.to(**to, dtype=dtype),
        keys.to(**to, dtype=dtype),
        values.to(**to, dtype=dtype),
        slot.to(**to),
        lo.to(**to),
        hi.to(**to),
    )


def _assert_bf16_like_math_path(out, ref, truth):
    """The kernel's bf16 error against float64 truth is no larger than the reference math path's (x 1.5)."""
    ours, theirs = (out.double() - truth).abs().mean().item(), (ref.double() - truth).abs().mean().item()
    assert ours <= 1.5 * theirs + 1e-3, f"bf16 error {ours:.2e} vs the math path's {theirs:.2e}"


def _truth(q, keys, values, slot, lo, hi, scale):
    args = [t.double() for t in (q, keys, values)] + [slot, lo, hi]
    return canvas_attention_reference(*args, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype):
    q, keys, values, slot, lo, hi = _inputs(shape, dtype, seed=0)
    out = torch.full_like(q, float("nan"))
    canvas_attention_triton(q, keys, values, slot, lo.clamp(min=0), hi, scale=0.3, out=out)
    assert not torch.isnan(out).any()
    ref = canvas_attention_reference(q, keys, values, slot, lo, hi, scale=0.3)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    truth = _truth(q, keys, values, slot, lo, hi, 0.3)
    _assert_bf16_like_math_path(out, ref, truth)


@pytest.mark.parametrize("window", [None, 5, 64], ids=["full", "window5", "window64"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_causal_mode_matches_reference(shape, dtype, window):
    """The encoder's attention: rows at different cached lengths (qpos), padded queries past each row's valid
    tokens (they see the valid keys before them and themselves), full or sliding windows shorter and longer
    than a query tile."""
    q, keys, values, slot, _, _ = _inputs(shape, dtype, seed=3)
    batch, tokens, capacity = q.shape[0], q.shape[1], keys.shape[2]
    g = torch.Generator().manual_seed(4)
    qpos = torch.randint(0, capacity - tokens + 1, (batch,), generator=g).to(DEVICE)
    valid = qpos + torch.randint(1, tokens + 1, (batch,), generator=g).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    lo = torch.zeros_like(qpos) if window is None else (qpos - window + 1).clamp(min=0)
    canvas_attention_triton(
        q, keys, values, slot, lo, qpos + tokens, scale=0.3, causal=(qpos, valid, window), out=out
    )
    assert not torch.isnan(out).any()
    ref = causal_attention_reference(q, keys, values, slot, qpos, valid, window=window, scale=0.3)
    assert torch.equal(causal_attention(q, keys, values, slot, qpos, valid, window=window, scale=0.3), ref)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    args = [t.double() for t in (q, keys, values)]
    truth = causal_attention_reference(*args, slot, qpos, valid, window=window, scale=0.3)
    _assert_bf16_like_math_path(out, ref, truth)


@pytest.mark.parametrize(
    "tokens, window, lengths",
    [(1, 1, [0, 1]), (129, 1, [0, 129]), (129, 40, [0, 70]), (33, None, [33, 0])],
    ids=["T1-window1", "T129-window1", "T129-window40", "T33-full"],
)
def test_causal_edges(tokens, window, lengths):
    """Rows with no valid new token (every query padded: it sees the cached keys before it and itself), a
    window of one (each query only itself), several query tiles, queries ending at the slot's last position."""
    g = torch.Generator().manual_seed(6)
    capacity = tokens + 40
    q = torch.randn(2, tokens, 4, 24, generator=g).to(DEVICE)
    keys, values = (torch.randn(3, 2, capacity, 24, generator=g).to(DEVICE) for _ in range(2))
    slot = torch.tensor([2, 0], device=DEVICE)
    qpos = torch.tensor([40, 13], device=DEVICE)  # row 0 ends at the capacity
    valid = qpos + torch.tensor(lengths, device=DEVICE)
    got = causal_attention(q, keys, values, slot, qpos, valid, window=window, scale=0.5, backend="triton")
    want = causal_attention_reference(q, keys, values, slot, qpos, valid, window=window, scale=0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_dispatcher_runs_the_kernel_and_checks_inputs():
    q, keys, values, slot, _, _ = _inputs(SHAPES["B3-T20-H4/2-d24"], torch.float32, seed=5)
    qpos = torch.tensor([0, 11, 50], device=DEVICE)
    valid = qpos + torch.tensor([20, 3, 9], device=DEVICE)
    got = causal_attention(q, keys, values, slot, qpos, valid, window=7, scale=1.0, backend="triton")
    want = causal_attention(q, keys, values, slot, qpos, valid, window=7, scale=1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="window=0 must be a positive"):
        causal_attention(q, keys, values, slot, qpos, valid, window=0, scale=1.0)
    with pytest.raises(ValueError, match="qpos must be int64"):
        causal_attention(q, keys, values, slot, qpos.int(), valid, window=None, scale=1.0)


def test_ranges_past_the_slot_are_clipped_and_empty_ranges_give_zeros():
    q, keys, values, slot, lo, hi = _inputs(SHAPES["B2-T7-H4/1-d40"], torch.float32, seed=3)
    capacity = keys.shape[2]
    past = torch.full_like(hi, capacity + 9)  # past the slot: the next slot's keys must not be read
    got = canvas_attention(q, keys, values, slot, lo, past, scale=1.0, backend="triton")
    want = canvas_attention(q, keys, values, slot, lo, past, scale=1.0)  # the mask ends at the capacity
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    empty = canvas_attention(q, keys, values, slot, hi, hi, scale=1.0, backend="triton")
    assert torch.equal(empty, torch.zeros_like(empty))


def test_dispatcher_clamps_the_range_and_checks_inputs():
    q, keys, values, slot, lo, hi = _inputs(SHAPES["B3-T20-H4/2-d24"], torch.float32, seed=1)
    got = canvas_attention(q, keys, values, slot, lo, hi, scale=1.0, backend="triton")  # lo < 0 in some rows
    torch.testing.assert_close(
        got, canvas_attention(q, keys, values, slot, lo, hi, scale=1.0), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="not one of torch, triton"):
        canvas_attention(q, keys, values, slot, lo, hi, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="query heads not a multiple"):
        canvas_attention(q[:, :, :3], keys, values, slot, lo, hi, scale=1.0)
    with pytest.raises(ValueError, match="lo must be int64"):
        canvas_attention(q, keys, values, slot, lo.int(), hi, scale=1.0)
    with pytest.raises(ValueError, match="must share a dtype"):
        canvas_attention(q.double(), keys, values, slot, lo, hi, scale=1.0, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        canvas_attention(
            q, keys.transpose(0, 1).contiguous().transpose(0, 1), values, slot, lo, hi, scale=1.0
        )


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    [(16, 8, 256), (16, 2, 512), (28, 4, 128)],
    ids=["sliding-d256", "global-d512", "dream7b-d128"],
)
def test_real_shape(heads, kv_heads, head_dim):
    """Batch 32, canvas 256 after a 128-token prompt, bf16, the whole capacity 1,024: DiffusionGemma-26B-A4B's
    two attention kinds (16 query heads), and Dream-7B's cached attention (28 query heads over 4)."""
    batch, tokens = 32, 256
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q = torch.randn(batch, tokens, heads, head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
    keys, values = (
        torch.randn(batch, kv_heads, 1024, head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
        for _ in range(2)
    )
    slot = torch.arange(batch, device=DEVICE)
    hi = torch.full((batch,), 128 + tokens, device=DEVICE)
    lo = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    canvas_attention_triton(q, keys, values, slot, lo, hi, scale=1.0, out=out)
    assert not torch.isnan(out).any()
    ref = canvas_attention_reference(q, keys, values, slot, lo, hi, scale=1.0)
    truth = _truth(q, keys, values, slot, lo, hi, 1.0)
    _assert_bf16_like_math_path(out, ref, truth)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kv_heads, head_dim, window", [(8, 256, 1024), (2, 512, None)], ids=["sliding-d256", "global-d512"]
)
def test_real_shape_causal(kv_heads, head_dim, window):
    """26B-A4B's encoder on a finished canvas: batch 32, 256 queries after 1,200 cached positions (so the
    sliding layers' window of 1,024 cuts the prefix), a few rows shorter than the canvas, bf16; capacity
    2,048."""
    batch, tokens = 32, 256
    g = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(batch, tokens, 16, head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
    keys, values = (
        torch.randn(batch, kv_heads, 2048, head_dim, generator=g, device=DEVICE).to(torch.bfloat16)
        for _ in range(2)
    )
    slot = torch.arange(batch, device=DEVICE)
    qpos = torch.full((batch,), 1200, device=DEVICE)
    valid = qpos + torch.where(slot % 5 == 0, 100, tokens)
    out = torch.full_like(q, float("nan"))
    lo = torch.zeros_like(qpos) if window is None else (qpos - window + 1).clamp(min=0)
    canvas_attention_triton(
        q, keys, values, slot, lo, qpos + tokens, scale=1.0, causal=(qpos, valid, window), out=out
    )
    assert not torch.isnan(out).any()
    ref = causal_attention_reference(q, keys, values, slot, qpos, valid, window=window, scale=1.0)
    args = [t.double() for t in (q, keys, values)]
    truth = causal_attention_reference(*args, slot, qpos, valid, window=window, scale=1.0)
    _assert_bf16_like_math_path(out, ref, truth)
