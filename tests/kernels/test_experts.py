"""The fused expert kernels against the reference, and the grouped mixture of experts on the Triton backend
against transformers' own expert loop: odd shapes (the interpreter on CPU), the 26B-A4B shape on a GPU, outputs
poisoned with NaN first. Tolerances: float32 1e-5 (+1e-5 relative); bf16 one unit in the last place (gelu's
tanh differs in its last bits between libdevice, the CPU and the interpreter) on at most 1% of elements, and
absolute differences under 1e-5 (gelu near zero)."""

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from benchmarks.bench_generate import SHAPES, VISION
from pipeline.kernels import experts
from pipeline.kernels.experts import reference
from pipeline.kernels.experts.triton_experts import combine_triton, gelu_mul_triton
from pipeline.models.moe import moe_forward
from tests.support.tolerance import assert_close_ulp as _assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows, width", [(37, 100), (3, 7), (1, 2048)], ids=["M37-I100", "M3-I7", "M1-I2048"])
def test_gelu_mul_matches_reference(rows, width, dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 3).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, as the expert path passes them
    out = torch.full((rows, width), float("nan"), dtype=dtype, device=DEVICE)
    gelu_mul_triton(gate, up, out=out)
    # gelu's 1 + tanh(x) cancels for x << 0: tanh implementations one ulp apart near -1 (the CPU's, the
    # interpreter's) give results of ~1e-7 against 0 there; on a GPU both are libdevice's tanhf.
    _assert_close(out, reference.gelu_mul(gate, up), "gelu_mul", atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "num, top_k, width",
    [(37, 3, 100), (5, 8, 1500), (1, 1, 16)],
    ids=["N37-k3-D100", "N5-k8-D1500", "N1-k1-D16"],
)
def test_combine_matches_reference(num, top_k, width, dtype):
    g = torch.Generator().manual_seed(1)
    ys = torch.randn(num * top_k, width, generator=g).to(DEVICE, dtype)
    inverse = torch.randperm(num * top_k, generator=g).to(DEVICE)
    weights = torch.rand(num, top_k, generator=g).to(DEVICE)
    out = torch.full((num, width), float("nan"), dtype=dtype, device=DEVICE)
    combine_triton(ys, inverse, weights, out=out)
    want = reference.combine(ys, inverse, weights)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    else:
        _assert_close(out, want, "combine")


def test_inputs_are_checked():
    a = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="gate and up must be"):
        experts.gelu_mul(a, a[:3], backend="triton")
    with pytest.raises(ValueError, match="unit column strides"):
        experts.gelu_mul(a.t(), a.t(), backend="triton")
    with pytest.raises(ValueError, match=r"ys must be \[N\*k, D\]"):
        experts.combine(a, torch.arange(4), torch.ones(2, 3), backend="triton")
    with pytest.raises(ValueError, match="not one of torch, triton"):
        experts.combine(a, torch.arange(4), torch.ones(2, 2), backend="cuda")
    with pytest.raises(ValueError, match="inverse must be int64"):
        experts.combine(a, torch.arange(4, dtype=torch.int32), torch.ones(2, 2), backend="triton")
    with pytest.raises(ValueError, match="gate and up must be"):
        experts.gelu_mul(a, a.double(), backend="triton")
    with pytest.raises(ValueError, match="backend='fast' is not one of torch, triton"):
        moe_forward(None, a, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), backend="fast")
    with pytest.raises(ValueError, match="gemm='cutlass' is not one of auto, grouped_mm, triton"):
        moe_forward(None, a, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), gemm="cutlass")
    with pytest.raises(ValueError, match="needs backend='triton'"):
        moe_forward(None, a, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), gemm="triton")


def _experts(shape: str, device: str, dtype: torch.dtype):
    text = dict(SHAPES[shape], num_hidden_layers=1, layer_types=SHAPES[shape]["layer_types"][:1])
    config = DiffusionGemmaConfig(text_config=text, vision_config=dict(VISION), canvas_length=16)
    torch.manual_seed(0)
    with torch.device(device):
        hf = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype).eval()
    return hf.model.decoder.layers[0]


@pytest.mark.parametrize("gemm", ["grouped_mm", "triton"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_grouped_experts_on_triton_match_transformers(dtype, gemm):
    layer = _experts("tiny", DEVICE, dtype)
    x = torch.randn(37, layer.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    _, weights, index = layer.router(x)
    with torch.no_grad():
        fused = moe_forward(layer.experts, x, index, weights, path="grouped", backend="triton", gemm=gemm)
        unfused = moe_forward(layer.experts, x, index, weights, path="grouped", backend="torch")
        ours = layer.experts(x, index, weights)  # transformers' own expert loop
    if dtype == torch.float32:
        torch.testing.assert_close(fused, ours, atol=1e-5, rtol=1e-5)
        return
    truth = _experts("tiny", DEVICE, torch.float32).experts(x.float(), index, weights)
    fused_err = (fused.float() - truth).abs().mean().item()
    ref_err = (ours.float() - truth).abs().mean().item()
    assert fused_err <= 1.2 * ref_err + 1e-4, (
        f"fused bf16 error {fused_err:.2e} vs transformers' {ref_err:.2e}"
    )
    assert (unfused.float() - truth).abs().mean().item() <= 1.2 * ref_err + 1e-4


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["grouped_mm", "triton"])
def test_real_shape_experts_match_transformers(gemm):
    """26B-A4B's experts (128, top-8, hidden 2,816, intermediate 704) on 8,192 tokens, bf16."""
    layer = _experts("26b-a4b", DEVICE, torch.bfloat16)
    x = torch.randn(8192, 2816, device=DEVICE).to(torch.bfloat16)
    _, weights, index = layer.router(x)
    with torch.no_grad():
        fused = moe_forward(layer.experts, x, index, weights, path="grouped", backend="triton", gemm=gemm)
        ours = layer.experts(x, index, weights)
        layer.float()
        truth = layer.experts(x.float(), index, weights)
    fused_err = (fused.float() - truth).abs().mean().item()
    ref_err = (ours.float() - truth).abs().mean().item()
    assert fused_err <= 1.2 * ref_err + 1e-4, (
        f"fused bf16 error {fused_err:.2e} vs transformers' {ref_err:.2e}"
    )
