"""Fused canvas attention (Triton): flash attention over one key range per row, read in place from the KV
cache, with the semantics of reference.py.

Why: with a boolean mask and GQA, scaled_dot_product_attention has no fused kernel and takes its math path:
keys and values expanded to every query head, [B, H, T, C] scores and probabilities materialised, float32
copies. At DiffusionGemma-26B-A4B's shape (batch 32, canvas 256, prefix 128) that is about 200 GB of memory
traffic a decoder step (benchmarks/step_profile.py), some 45 ms at 4.3 TB/s. Here each program holds BLOCK_M
queries of one head, walks the row's keys [lo, hi) in blocks of BLOCK_N with an online softmax (scores and
the running max, normaliser and output in float32, probabilities rounded to the values' dtype for the second
product, as flash attention does), and reads q in its [B, T, H, d] layout and writes the output in it, so no
transpose or expansion is made and nothing of size T x C reaches memory.

CAUSAL mode is the encoder's attention (reference.causal_attention_reference): query t of a row sits at
position qpos + t and sees keys j <= p below the row's valid length (or itself), within the layer's window;
each query tile walks only the keys its queries can see, so nothing of size T x C is built either (the
encoder's boolean masks and the math path's [B, H, T, C] float32 scores: 34 GB a layer for 32 prompts of 4,096
tokens).

Block sizes: the float32 output accumulator is BLOCK_M x d per program: 64 x 256 (sliding layers) and 32 x
512 (global layers) are 64 KB, 64 registers a thread in 8 warps (see _launch_params; pipeline.kernels.aot
checks the builds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.triton_math import device_flags, to_elem


@triton.jit
def _canvas_attention_kernel(
    q_ptr,  # [B, T, H, d]
    k_ptr,  # [S, H_kv, C, d] one layer's key cache
    v_ptr,  # [S, H_kv, C, d]
    slot_ptr,  # [B] int64 slot of each row
    lo_ptr,  # [B] int64 first visible key position (>= 0)
    hi_ptr,  # [B] int64 one past the last visible key position (> lo)
    out_ptr,  # [B, T, H, d]
    qpos_ptr,  # [B] int64 position of query 0 (CAUSAL)
    valid_ptr,  # [B] int64 one past the row's last valid key (CAUSAL)
    tokens,
    heads,
    kv_heads,
    capacity,
    head_dim,
    scale,
    window,  # CAUSAL: keys j > p - window of the query at p (a huge number for full attention)
    CAUSAL: tl.constexpr,  # the encoder: query p sees keys j <= p (j < valid, or j == p), within the window
    IEEE: tl.constexpr,  # float32 products in full precision (not tf32)
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row_head = tl.program_id(0)  # batch x heads on axis 0 (axis 1 is limited to 65,535 programs)
    block_m = tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    kv_head = head // (heads // kv_heads)
    slot = tl.load(slot_ptr + row)
    lo = tl.load(lo_ptr + row)
    hi = tl.load(hi_ptr + row)
    dtype = out_ptr.dtype.element_ty

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_rows = ((row.to(tl.int64) * tokens + offs_m) * heads + head) * head_dim  # [M]
    q_mask = (offs_m < tokens)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)  # [M, D]
    if ROUND_BF16:  # the interpreter's bf16 dot is wrong (it multiplies the raw bits): exact float32 instead
        q = q.to(tl.float32)
    kv_base = (slot * kv_heads + kv_head) * capacity * head_dim

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # this tile's queries see keys up to its last query, from its first query's window on
        valid = tl.load(valid_ptr + row)
        first = tl.load(qpos_ptr + row) + block_m * BLOCK_M  # position of the tile's first query
        lo = tl.maximum(lo, first - window + 1)
        hi = tl.minimum(hi, first + BLOCK_M)
    # Blocks aligned to BLOCK_N from the one holding key `lo`; a query with no visible key in a block (causal
    # tiles only) adds nothing to it (see `base` below).
    for start in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = (offs_n >= lo) & (offs_n < hi)  # [N]
        kv_offs = kv_base + offs_n.to(tl.int64)[:, None] * head_dim + offs_d[None, :]
        kv_mask = visible[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)  # [N, D]
        if ROUND_BF16:
            k = k.to(tl.float32)
        if IEEE or ROUND_BF16:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if (
            CAUSAL
        ):  # j <= p, j < valid or j == p, j > p - window; as int32 offsets from the tile's first query
            rel = (offs_n - first).to(tl.int32)[None, :]  # key j - first (keys lie within a window of it)
            m = tl.arange(0, BLOCK_M)[:, None]  # query p - first
            rel_valid = tl.minimum(tl.maximum(valid - first, -(2**30)), BLOCK_M + 1).to(tl.int32)
            seen = visible[None, :] & (((rel <= m) & (rel < rel_valid)) | (rel == m)) & (rel + window > m)
        else:
            seen = visible[None, :]
        s = tl.where(seen, s * scale, float("-inf"))  # [M, N] float32
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # no -inf - -inf for a row with no key yet
        alpha = tl.exp(run_max - base)
        p = tl.exp(s - base[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)  # [N, D]
        p_elem = to_elem(p, v.dtype, ROUND_BF16)
        if ROUND_BF16:
            acc = acc * alpha[:, None] + tl.dot(
                p_elem.to(tl.float32), v.to(tl.float32), input_precision="ieee"
            )
        elif IEEE:
            acc = acc * alpha[:, None] + tl.dot(p_elem, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p_elem, v)
        run_max = new_max
    out = acc / tl.where(run_sum > 0.0, run_sum, 1.0)[:, None]  # an empty range gives zeros, as SDPA
    tl.store(out_ptr + q_rows[:, None] + offs_d[None, :], to_elem(out, dtype, ROUND_BF16), mask=q_mask)


def _launch_params(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a head size. Chosen from sm_90 builds (pipeline.kernels.aot,
    triton 3.9): d = 256 at 64 x 32 in 8 warps takes 184 registers, 99 KB shared memory and wgmma; 64 x 64 takes
    235 and 165 KB. d = 512 spills at any BLOCK_M of 64; 32 x 32 in 8 warps takes 218, no spills."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 128:
        return 64, 32, block_d, 4
    if block_d <= 256:
        return 64, 32, block_d, 8
    return 32, 32, block_d, 8


def canvas_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    scale: float,
    causal: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, T, H, d] contiguous; keys/values [S, H_kv, C, d] contiguous; slots, lo, hi [B] int64 on q's
    device with 0 <= lo < hi <= C. Returns (or writes into `out`) [B, T, H, d] in q's dtype. `causal` =
    (positions of query 0 [B], valid key ends [B], window or None) for the encoder (see
    reference.causal_attention_reference); lo, hi then bound each row's keys."""
    batch, tokens, heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    qpos, valid, window = causal if causal is not None else (slots, slots, None)
    if window is not None and not 0 < window < 2**30:
        raise ValueError(f"window={window} must be in [1, 2**30), or None for full attention")
    if batch and tokens:
        block_m, block_n, block_d, warps = _launch_params(head_dim)
        _canvas_attention_kernel[(batch * heads, triton.cdiv(tokens, block_m))](
            q, keys, values, slots, lo, hi, out, qpos, valid,
            tokens, heads, keys.shape[1], keys.shape[2], head_dim, float(scale),
            2**30 if window is None else window, CAUSAL=causal is not None,
            IEEE=q.dtype == torch.float32, ROUND_BF16=device_flags(q)["ROUND_BF16"],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=2,
        )  # fmt: skip
    return out
