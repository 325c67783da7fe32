"""The experts' grouped GEMM kernel (kernels/experts/triton_gemm.py) against its reference: rows gathered
through the token index or read in order, plain or with gelu x up fused, at odd shapes (K not a multiple of
the tile, experts with no rows, at the ends and in the middle, one expert with every row, 128 experts over a
few rows) on the CPU under the interpreter, and at the 26B-A4B shape on a GPU; outputs poisoned with NaN.
Tolerances: float32 1e-5 relative; bf16 one unit in the last place on at most 1% of elements (the products'
summation order differs from torch's)."""

import pytest
import torch

from pipeline.kernels import experts
from pipeline.kernels.experts import reference
from pipeline.kernels.experts.triton_gemm import expert_gemm_triton
from tests.support.tolerance import assert_close_ulp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _routing(num: int, top_k: int, num_experts: int, *, skew: str, seed: int):
    """Expert-sorted assignment rows (token index of each), and each expert's end row."""
    g = torch.Generator().manual_seed(seed)
    if skew == "one":  # every assignment to expert 2
        index = torch.full((num, top_k), 2)
    elif skew == "gaps":  # experts 0, 3 and the last get nothing
        allowed = torch.tensor([e for e in range(num_experts) if e not in (0, 3, num_experts - 1)])
        index = allowed[torch.stack([torch.randperm(len(allowed), generator=g)[:top_k] for _ in range(num)])]
    else:
        index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num)])
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return (order // top_k).to(DEVICE), torch.cumsum(counts, 0, dtype=torch.int32).to(DEVICE)


CASES = {
    "N37-k3-E5-K72-O80": (37, 3, 5, 72, 80, "spread"),
    "N29-k4-E9-K100-O46-gaps": (29, 4, 9, 100, 46, "gaps"),
    "N70-k1-E4-K33-O18-one": (70, 1, 4, 33, 18, "one"),
    "N6-k8-E128-K64-O64": (6, 8, 128, 64, 64, "spread"),
    "N9-k2-E3-K40-O330": (9, 2, 3, 40, 330, "spread"),  # several column tiles at the bf16 tile (128)
}


@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "in-order"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_expert_gemm_matches_reference(case, dtype, gather, gelu):
    num, top_k, num_experts, depth, out_features, skew = case
    rows, offsets = _routing(num, top_k, num_experts, skew=skew, seed=num)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(num if gather else num * top_k, depth, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(num_experts, out_features, depth, generator=g) * depth**-0.5).to(DEVICE, dtype)
    width = out_features // 2 if gelu else out_features
    out = torch.full((num * top_k, width), float("nan"), dtype=dtype, device=DEVICE)
    used = rows if gather else None
    expert_gemm_triton(x, used, weight, offsets, gelu=gelu, out=out)
    assert_close_ulp(
        out, reference.expert_gemm(x, used, weight, offsets, gelu=gelu), "expert_gemm", atol=1e-5
    )


def test_the_dispatcher_runs_either_backend_and_checks_its_inputs():
    rows, offsets = _routing(11, 2, 3, skew="spread", seed=0)
    x = torch.randn(11, 40, device=DEVICE)
    weight = torch.randn(3, 24, 40, device=DEVICE) * 40**-0.5
    fused = experts.expert_gemm(x, rows, weight, offsets, gelu=True, backend="triton")
    torch.testing.assert_close(
        fused, experts.expert_gemm(x, rows, weight, offsets, gelu=True, backend="torch")
    )
    assert fused.shape == (22, 12)
    with pytest.raises(ValueError, match=r"x must be \[N, K\] and weight \[E, OUT, K\]"):
        experts.expert_gemm(x[:, :39], rows, weight, offsets, gelu=False, backend="triton")
    with pytest.raises(ValueError, match="offsets must be int32"):
        experts.expert_gemm(x, rows, weight, offsets.long(), gelu=False, backend="triton")
    with pytest.raises(ValueError, match="rows must be int64"):
        experts.expert_gemm(x, rows.int(), weight, offsets, gelu=False, backend="triton")
    with pytest.raises(ValueError, match="even number of output features"):
        experts.expert_gemm(x, rows, weight[:, :23], offsets, gelu=True, backend="triton")
    with pytest.raises(ValueError, match="unit last stride"):
        experts.expert_gemm(x, rows, weight.transpose(1, 2).contiguous().transpose(1, 2), offsets, gelu=False,
                            backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="backend='cuda' is not one of torch, triton"):
        experts.expert_gemm(x, rows, weight, offsets, gelu=False, backend="cuda")


def test_no_rows_gives_an_empty_result():
    x = torch.randn(0, 16, device=DEVICE)
    weight = torch.randn(4, 8, 16, device=DEVICE)
    offsets = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    rows = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert expert_gemm_triton(x, rows, weight, offsets, gelu=True).shape == (0, 4)


def test_rows_past_the_offsets_end_are_not_touched():
    """offsets[-1] < M (rows no expert owns) leaves those output rows as they were; the kernel never reads or
    writes past M even if offsets claimed more."""
    x = torch.randn(10, 16, device=DEVICE)
    weight = torch.randn(2, 8, 16, device=DEVICE)
    rows = torch.arange(10, device=DEVICE)
    out = torch.full((10, 8), 7.0, device=DEVICE)
    expert_gemm_triton(
        x, rows, weight, torch.tensor([3, 6], dtype=torch.int32, device=DEVICE), gelu=False, out=out
    )
    assert (out[6:] == 7.0).all() and not (out[:6] == 7.0).any()
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        expert_gemm_triton(x, rows, weight, torch.tensor([3, 6], dtype=torch.int32), gelu=True, out=out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("skew", ["spread", "gaps"])
def test_real_shape_expert_gemm_matches_reference(skew):
    """26B-A4B's experts (128, top-8, hidden 2,816, intermediate 704) at batch 32 (8,192 tokens), bf16;
    routing over every expert, or with three experts left empty."""
    rows, offsets = _routing(8192, 8, 128, skew=skew, seed=3)
    x = torch.randn(8192, 2816, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(128, 1408, 2816, device=DEVICE, dtype=torch.bfloat16) * 2816**-0.5
    down = torch.randn(128, 2816, 704, device=DEVICE, dtype=torch.bfloat16) * 704**-0.5
    hidden = expert_gemm_triton(x, rows, gate_up, offsets, gelu=True)
    assert_close_ulp(
        hidden, reference.expert_gemm(x, rows, gate_up, offsets, gelu=True), "gate_up", atol=1e-3
    )
    ys = expert_gemm_triton(hidden, None, down, offsets, gelu=False)
    assert_close_ulp(ys, reference.expert_gemm(hidden, None, down, offsets, gelu=False), "down", atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_launch_follows_new_routing():
    """The launch reads its tiles' experts from `offsets` on the device: a CUDA graph captured with one routing
    and replayed after the rows and offsets tensors were overwritten with another computes the new one."""
    x = torch.randn(2048, 2816, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(128, 1408, 2816, device=DEVICE, dtype=torch.bfloat16) * 2816**-0.5
    rows, offsets = _routing(2048, 8, 128, skew="spread", seed=4)
    out = torch.empty(rows.numel(), 704, device=DEVICE, dtype=torch.bfloat16)
    expert_gemm_triton(x, rows, gate_up, offsets, gelu=True, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        expert_gemm_triton(x, rows, gate_up, offsets, gelu=True, out=out)
    new_rows, new_offsets = _routing(2048, 8, 128, skew="gaps", seed=5)
    rows.copy_(new_rows)
    offsets.copy_(new_offsets)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.expert_gemm(x, new_rows, gate_up, new_offsets, gelu=True)
    assert_close_ulp(out, want, "replayed gate_up", atol=1e-3)
