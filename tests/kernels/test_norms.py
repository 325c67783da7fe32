"""The fused norm kernels against the torch reference (transformers' op order): odd shapes on any device (the
interpreter on CPU), DiffusionGemma-26B-A4B's shapes on a GPU; every output poisoned with NaN first.

Tolerances: bf16, each element equal to the reference or one unit in the last place away (float32 sums of
squares in another order than torch's mean), and at most 1% of them differ; float32 within 1e-5 relative
(+1e-6). One-ulp bf16 differences compound through the chained norms of a tail, so they are counted there.
"""

import pytest
import torch

from pipeline.kernels import norms
from pipeline.kernels.norms import reference
from pipeline.kernels.norms.triton_norms import attention_tail_triton, ffn_tail_triton, head_norm_rope_triton
from tests.support.tolerance import assert_close_ulp as _assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
EPS = 1e-6


def _rows(num, dim, dtype, seed, scales=(1.0, 3.0, 0.5)):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(num, dim, generator=g) * s for s in scales]
    weights = [1.0 + 0.3 * torch.randn(dim, generator=g) for _ in range(5)]
    return [t.to(DEVICE, dtype) for t in rows], [w.to(DEVICE, dtype) for w in weights]


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


ROW_SHAPES = {"N37-D100": (37, 100), "N5-D72": (5, 72), "N1-D1": (1, 1)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ROW_SHAPES.values(), ids=ROW_SHAPES.keys())
def test_attention_tail_matches_reference(shape, dtype):
    num, dim = shape
    (attn, residual, _), (post, pre, pre2, scale, _) = _rows(num, dim, dtype, seed=1)
    args = (attn, residual, post, pre, pre2, scale, dim**-0.5, EPS)
    out = tuple(_nan_like(residual) for _ in range(4))
    attention_tail_triton(*args, out=out)
    want = reference.attention_tail(*args)
    for name, g, w in zip(("hidden", "mlp_in", "moe_in", "router_in"), out, want, strict=True):
        _assert_close(g, w, name)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ROW_SHAPES.values(), ids=ROW_SHAPES.keys())
@pytest.mark.parametrize("with_next", [True, False], ids=["next-norm", "last-layer"])
def test_ffn_tail_matches_reference(shape, dtype, with_next):
    num, dim = shape
    (dense, experts, residual), (w1, w2, w, nxt, _) = _rows(num, dim, dtype, seed=2)
    scalar = torch.tensor([0.7], dtype=dtype, device=DEVICE)
    next_weight = nxt if with_next else None
    args = (dense, experts, residual, w1, w2, w, scalar, EPS, next_weight)
    out = (_nan_like(residual), _nan_like(residual) if with_next else None)
    ffn_tail_triton(*args, out=out)
    want = reference.ffn_tail(*args)
    _assert_close(out[0], want[0], "hidden", max_fraction=0.02)
    if with_next:
        _assert_close(out[1], want[1], "next input", max_fraction=0.02)


def test_ffn_tail_rounds_a_float32_layer_scalar_like_the_in_place_product():
    (dense, experts, residual), (w1, w2, w, _, _) = _rows(9, 40, torch.bfloat16, seed=3)
    scalar = torch.tensor([0.3], dtype=torch.float32, device=DEVICE)
    got, _ = norms.ffn_tail(dense, experts, residual, w1, w2, w, scalar, EPS, backend="triton")
    want, _ = reference.ffn_tail(dense, experts, residual, w1, w2, w, scalar, EPS)
    assert want.dtype == torch.bfloat16
    _assert_close(got, want, "hidden", max_fraction=0.02)


HEAD_SHAPES = {  # (batch, tokens, heads, head_dim): rows not a multiple of the block, d not a power of two
    "B2-T5-H3-d24": (2, 5, 3, 24),
    "B3-T7-H5-d40": (3, 7, 5, 40),
    "B1-T1-H1-d2": (1, 1, 1, 2),
}
HEAD_MODES = {  # (weight, rope, norm): q/k, v, a norm without rope, a rope without norm
    "q-k": (True, True, True),
    "v": (False, False, True),
    "norm-only": (True, False, True),
    "rope-only": (False, True, False),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("mode", HEAD_MODES.values(), ids=HEAD_MODES.keys())
@pytest.mark.parametrize("shape", HEAD_SHAPES.values(), ids=HEAD_SHAPES.keys())
def test_head_norm_rope_matches_reference(shape, mode, dtype):
    batch, tokens, heads, dim = shape
    with_weight, rope, norm = mode
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(batch, tokens, heads, dim, generator=g) * 2).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(DEVICE, dtype) if with_weight else None
    angles = torch.randn(batch, tokens, dim // 2, generator=g) * 3
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = (angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)) if rope else (None, None)
    eps = EPS if norm else None
    out = _nan_like(x)
    head_norm_rope_triton(x, weight, cos, sin, eps, out=out)
    _assert_close(out, reference.head_norm_rope(x, weight, cos, sin, eps), "heads")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("mode", [HEAD_MODES["q-k"], HEAD_MODES["v"]], ids=["keys", "values"])
def test_head_norm_rope_into_the_cache_matches_the_indexed_assignment(mode, dtype):
    """Rows land at cache[slots[b], h, positions[b, t]] (scattered slots, per-row offsets) and nowhere else."""
    batch, tokens, heads, dim, num_slots, capacity = 3, 5, 2, 24, 5, 40
    with_weight, rope, _ = mode
    g = torch.Generator().manual_seed(9)
    x = torch.randn(batch, tokens, heads, dim, generator=g).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(DEVICE, dtype) if with_weight else None
    angles = torch.randn(batch, tokens, dim // 2, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = (angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)) if rope else (None, None)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    positions = torch.tensor([[3], [17], [30]], device=DEVICE) + torch.arange(tokens, device=DEVICE)
    before = torch.randn(num_slots, heads, capacity, dim, generator=g).to(DEVICE, dtype)
    got, want = before.clone(), before.clone()
    norms.head_norm_rope_to_cache(x, weight, cos, sin, EPS, got, slots, positions, backend="triton")
    norms.head_norm_rope_to_cache(x, weight, cos, sin, EPS, want, slots, positions, backend="torch")
    written = torch.zeros(num_slots, capacity, dtype=torch.bool, device=DEVICE)
    written[slots[:, None], positions] = True
    assert torch.equal(got.transpose(1, 2)[~written], before.transpose(1, 2)[~written]), (
        "wrote outside the rows"
    )
    _assert_close(got, want, "cache")
    with pytest.raises(ValueError, match=r"cache must be \[S, 2, C, 24\]"):
        norms.head_norm_rope_to_cache(
            x, weight, cos, sin, EPS, got[:, :1], slots, positions, backend="triton"
        )
    with pytest.raises(ValueError, match="positions"):
        norms.head_norm_rope_to_cache(
            x, weight, cos, sin, EPS, got, slots, positions[:, :2], backend="triton"
        )


def test_strided_inputs_are_read_by_their_strides():
    """A slice of a wider tensor (rows not head_dim apart) gives the reference's result, not its neighbours'."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 2, 32, generator=g).to(DEVICE)[..., :16]
    w = torch.ones(16, device=DEVICE)
    _assert_close(
        norms.head_norm_rope(x, w, None, None, EPS, backend="triton"),
        reference.head_norm_rope(x, w, None, None, EPS),
        "heads",
    )
    rows = torch.randn(5, 64, generator=g).to(DEVICE)[:, :32]
    _assert_close(
        norms.rms_norm(rows, None, EPS, backend="triton"), reference.rms_norm(rows, None, EPS), "rms"
    )


def test_rms_norm_dispatch_matches_reference():
    (x, _, _), (w, _, _, _, _) = _rows(11, 56, torch.bfloat16, seed=5)
    for weight in (w, None):
        _assert_close(
            norms.rms_norm(x, weight, EPS, backend="triton"), reference.rms_norm(x, weight, EPS), "rms"
        )
        assert torch.equal(
            norms.rms_norm(x, weight, EPS, backend="torch"), reference.rms_norm(x, weight, EPS)
        )


def test_rejects_bad_inputs():
    (a, b, _), (w, _, _, _, _) = _rows(4, 8, torch.float32, seed=6)
    with pytest.raises(ValueError, match="backend='cuda'"):
        norms.rms_norm(a, w, EPS, backend="cuda")
    with pytest.raises(ValueError, match=r"post_weight must be \[8\]"):
        norms.attention_tail(a, b, w[:4], w, w, w, 0.5, EPS, backend="triton")
    with pytest.raises(ValueError, match="residual must be"):
        norms.attention_tail(a, b[:3], w, w, w, w, 0.5, EPS, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        norms.ffn_tail(a, b.t().contiguous().t(), b, w, w, w, w[:1], EPS, backend="triton")
    with pytest.raises(ValueError, match="layer_scalar must hold one value"):
        norms.ffn_tail(a, b, b, w, w, w, w, EPS, backend="triton")
    with pytest.raises(ValueError, match="post_weight is required"):
        norms.attention_tail(a, b, None, w, w, w, 0.5, EPS, backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        norms.attention_tail(a, b.double(), w, w, w, w, 0.5, EPS, backend="triton")
    hidden, *_ = norms.attention_tail(
        a, b, w.double(), w, w, w, 0.5, EPS, backend="triton"
    )  # float64 weights
    _assert_close(hidden, reference.attention_tail(a, b, w.double(), w, w, w, 0.5, EPS)[0], "mixed weights")
    with pytest.raises(ValueError, match="cos must be torch.float32 like x"):
        x4 = a.reshape(1, 4, 1, 8)
        norms.head_norm_rope(
            x4, None, a.reshape(1, 4, 8).double(), a.reshape(1, 4, 8).double(), EPS, backend="triton"
        )
    wide, w_wide = torch.zeros(1, norms.MAX_ROW + 1), torch.ones(norms.MAX_ROW + 1)
    with pytest.raises(ValueError, match="exceed the fused kernels"):
        norms.attention_tail(wide, wide, w_wide, w_wide, w_wide, w_wide, 0.5, EPS, backend="triton")
    x = a.reshape(1, 4, 1, 8)
    with pytest.raises(ValueError, match="both cos and sin"):
        norms.head_norm_rope(x, None, a.reshape(1, 4, 8), None, EPS, backend="triton")
    with pytest.raises(ValueError, match=r"cos must be \[1, 4, 8\]"):
        norms.head_norm_rope(x, None, a, a, EPS, backend="triton")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [256, 512], ids=["sliding-d256", "global-d512"])
def test_real_shapes_match_reference(head_dim):
    """DiffusionGemma-26B-A4B at batch 32: 8,192 canvas positions, hidden 2,816, 16 query heads, bf16."""
    num, dim, heads = 8192, 2816, 16
    (attn, residual, dense), (post, pre, pre2, scale, nxt) = _rows(num, dim, torch.bfloat16, seed=7)
    args = (attn, residual, post, pre, pre2, scale, dim**-0.5, EPS)
    out = tuple(_nan_like(residual) for _ in range(4))
    attention_tail_triton(*args, out=out)
    for name, g, w in zip(
        ("hidden", "mlp_in", "moe_in", "router_in"), out, reference.attention_tail(*args), strict=True
    ):
        _assert_close(g, w, name)
    scalar = torch.ones(1, dtype=torch.bfloat16, device=DEVICE)
    args = (dense, attn, residual, post, pre, pre2, scalar, EPS, nxt)
    out = (_nan_like(residual), _nan_like(residual))
    ffn_tail_triton(*args, out=out)
    for name, g, w in zip(("hidden", "next"), out, reference.ffn_tail(*args), strict=True):
        _assert_close(g, w, name, max_fraction=0.02)
    x = torch.randn(32, 256, heads, head_dim, device=DEVICE).to(torch.bfloat16)
    angles = torch.rand(32, 256, head_dim // 2, device=DEVICE) * 100
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(head_dim, device=DEVICE)).to(torch.bfloat16)
    out = _nan_like(x)
    head_norm_rope_triton(x, weight, cos, sin, EPS, out=out)
    _assert_close(out, reference.head_norm_rope(x, weight, cos, sin, EPS), "heads")
