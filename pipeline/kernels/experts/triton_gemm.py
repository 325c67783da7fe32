"""The experts' grouped products as one Triton kernel, with the semantics of reference.expert_gemm.

Rows (token-expert assignments) are sorted by expert; `offsets` [E] holds each expert's end row. Each program
computes one BLOCK_M x BLOCK_N tile of one expert's rows: the tile -> (expert, first row) map is worked out
inside the program from `offsets` (a prefix sum over the E experts' tile counts), so the grid is fixed by the
row count alone and nothing is read back to the host: the launch is CUDA-graph safe.

Two fusions over torch's `index_select` + `torch._grouped_mm` + gelu x up:

- GATHER: the A rows are read straight from the tokens' hidden states x [N, K] through the row -> token
  index, so the [N*k, K] gathered copy is never written (at 26B-A4B batch 32 it is 369 MB a layer, written
  and read back).
- GELU (the experts' gate/up product, weight [E, 2I, K]): each program's product columns interleave the gate
  column n and the up column I + n of its output columns, one accumulator fed by one operand a step, and it
  writes gelu_tanh(gate) * up [M, I], so the [M, 2I] product is never written and read back either. The
  products are rounded to the output dtype before the activation, as torch rounds the grouped product's
  output, so the fused result equals gelu_mul(product) but for the products' summation order.

Program order: the BLOCK_N tiles of one row tile are consecutive programs, so a row tile's gathered A rows
are read from memory once and then from L2; one expert's weights serve its row tiles from L2 too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.triton_math import device_flags, rounded, tanh, to_elem

# Tiles benchmarks/bench_experts.py times at the real shape (the first is launch_params' bf16 default); the
# sm_90 builds of all of them are checked by pipeline.kernels.aot.
TILE_CANDIDATES = {
    "64x128x64 w4 s4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "128x128x64 w8 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "128x256x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
}
_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _expert_gemm_kernel(
    x_ptr,  # [N, K] hidden states (GATHER) or [M, K] rows grouped by expert
    rows_ptr,  # [M] int64 row of x of each sorted assignment (read with GATHER)
    w_ptr,  # [E, OUT, K]: gate_up_proj [E, 2I, D] (GELU) or down_proj [E, D, I]
    offsets_ptr,  # [E] int32 end row of each expert (cumulative counts)
    out_ptr,  # [M, width] contiguous; width = I with GELU, else OUT
    rows,
    num_experts,
    depth,  # K
    width,
    stride_x,
    stride_we,
    stride_wo,
    GATHER: tl.constexpr,
    GELU: tl.constexpr,
    IEEE: tl.constexpr,  # float32 products in full precision (not tf32)
    CUDA: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    E_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    PAIR: tl.constexpr = 2 if GELU else 1  # product columns per output column (gate and up with GELU)
    OUT_BLOCK: tl.constexpr = BLOCK_N // PAIR  # output columns a program writes
    n_tiles = tl.cdiv(width, OUT_BLOCK)
    m_tile = pid // n_tiles
    n_tile = pid % n_tiles

    # Which expert owns row tile m_tile: experts' tiles are laid end to end in expert order.
    e_idx = tl.arange(0, E_BLOCK)
    real = e_idx < num_experts
    ends = tl.load(offsets_ptr + e_idx, mask=real, other=0)
    starts = tl.load(offsets_ptr + e_idx - 1, mask=real & (e_idx > 0), other=0)
    counts = tl.where(real, ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    expert = tl.sum((real & (tile_end <= m_tile)).to(tl.int32), 0)
    if expert >= num_experts:  # past the last tile: the grid is sized for the worst case
        return
    mine = e_idx == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (m_tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)

    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_ok = (offs_m < row_end) & (offs_m < rows)  # offsets past the rows must not read or write past them
    if GATHER:
        a_rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0)
    else:
        a_rows = offs_m.to(tl.int64)
    # Product column j: output column n_tile * OUT_BLOCK + j // PAIR; with GELU even j are its gate (weight
    # row c), odd j its up (weight row width + c), so one [K, BLOCK_N] operand feeds one product a step.
    j = tl.arange(0, BLOCK_N)
    cols = n_tile * OUT_BLOCK + j // PAIR
    col_ok = cols < width
    weight_rows = (cols + (j % PAIR) * width).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + a_rows[:, None] * stride_x + offs_k[None, :]  # [M, K]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    b_ptrs = w_base + weight_rows[None, :] * stride_wo + offs_k[:, None]  # [K, N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        k_ok = offs_k < depth - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if ROUND_BF16:  # the interpreter's bf16 dot is wrong: exact float32 instead
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE or ROUND_BF16:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    dtype = out_ptr.dtype.element_ty
    offs_c = n_tile * OUT_BLOCK + tl.arange(0, OUT_BLOCK)
    if GELU:  # torch's grouped product output in the model's dtype, then gelu_mul's roundings
        gate, up = tl.split(tl.reshape(rounded(acc, dtype, ROUND_BF16), [BLOCK_M, OUT_BLOCK, 2]))
        inner = _BETA * (gate + _KAPPA * (gate * gate * gate))
        act = rounded(0.5 * gate * (1.0 + tanh(inner, CUDA)), dtype, ROUND_BF16)
        result = to_elem(act * up, dtype, ROUND_BF16)
    else:
        result = to_elem(acc, dtype, ROUND_BF16)
    out_offs = offs_m.to(tl.int64)[:, None] * width + offs_c[None, :]
    tl.store(out_ptr + out_offs, result, mask=m_ok[:, None] & (offs_c < width)[None, :])


def launch_params(dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps. bf16/fp16 on the GPU: 64-row tiles (an expert's rows are padded to a tile, ~512
    rows an expert at 26B-A4B batch 32), 128 product columns a program (64 gate/up pairs with GELU), K in
    steps of 64 over 4 pipeline stages: 96 KB of shared memory, a 64 x 128 float32 accumulator in 4 warps, one
    m64n128k16 wgmma a step (pipeline.kernels.aot checks the builds; benchmarks/bench_experts.py times the
    TILE_CANDIDATES). float32 (tests, small models): 32 x 32 x 32."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(TILE_CANDIDATES["64x128x64 w4 s4"])


def expert_gemm_triton(
    x: torch.Tensor,
    rows: torch.Tensor | None,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    *,
    gelu: bool,
    out: torch.Tensor | None = None,
    tiles: dict[str, int] | None = None,
) -> torch.Tensor:
    """x [N, K] (or [M, K] when rows is None) with unit column stride; rows [M] int64 or None; weight
    [E, OUT, K] with unit K stride; offsets [E] int32 cumulative row counts (offsets[-1] = M). Returns (or
    writes into `out`, contiguous) [M, OUT // 2] (gelu) or [M, OUT] in x's dtype. `tiles` replaces
    launch_params' BLOCK_M / BLOCK_N / BLOCK_K / num_warps / num_stages (the benchmark's sweep)."""
    num_rows = rows.shape[0] if rows is not None else x.shape[0]
    num_experts, out_features, depth = weight.shape
    width = out_features // 2 if gelu else out_features
    if x.stride(1) != 1 or weight.stride(2) != 1:
        raise ValueError(f"x and weight need a unit last stride; got {x.stride()} and {weight.stride()}")
    if out is None:
        out = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    elif out.shape != (num_rows, width) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(
            f"out must be contiguous {x.dtype} [{num_rows}, {width}]; got {out.dtype} {tuple(out.shape)}"
        )
    if num_rows == 0 or width == 0:
        return out
    params = {**launch_params(x.dtype), **(tiles or {})}
    block_m, block_n = params["BLOCK_M"], params["BLOCK_N"]
    # Every expert's rows start a new tile: at most cdiv(M, BLOCK_M) + E - 1 row tiles.
    m_tiles = triton.cdiv(num_rows, block_m) + num_experts - 1
    grid = (m_tiles * triton.cdiv(width, block_n // (2 if gelu else 1)),)
    flags = device_flags(x)
    _expert_gemm_kernel[grid](
        x, x if rows is None else rows, weight, offsets, out,
        num_rows, num_experts, depth, width, x.stride(0), weight.stride(0), weight.stride(1),
        GATHER=rows is not None, GELU=gelu, IEEE=x.dtype == torch.float32, **flags,
        E_BLOCK=triton.next_power_of_2(num_experts), **params,
    )  # fmt: skip
    return out
