"""Fused RMS norms of a DiffusionGemma layer (Triton), with the semantics of reference.py: each kernel reads
its inputs once and writes its outputs once, where transformers' modules make a float32 copy, square, mean,
power, two products and a cast per norm (about ten passes over [N, D] float32 each).

Per layer, instead of eleven norms, two residual adds, the router's two products and the layer scalar:
  _attention_tail_kernel  one program per token: attn_out, residual -> hidden, dense MLP input, experts
                          input, router input (the last three share hidden's mean square)
  _ffn_tail_kernel        one program per token: dense, experts, residual -> hidden (and the next layer's
                          input norm of it, so the next layer starts with no norm of its own)
  _head_kernel            BLOCK_R heads per program: q/k/v norm over head_dim and the rotary embedding
Every intermediate that torch rounds to the model's dtype is rounded the same way here (to nearest even, also
in the interpreter); float32 sums of squares are taken in a different order than torch's mean, so results may
differ from the reference by one unit in the last place of the model's dtype, rarely.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from pipeline.kernels.rng_triton import libdevice
from pipeline.kernels.triton_math import device_flags, rounded, to_elem

# A row program holds the whole row (at most norms.MAX_ROW); 4,096 float32 values in 8 warps are 16 registers
# a thread per tensor.
HEAD_BLOCK_ELEMENTS = 4096  # rows x head_dim per program of _head_kernel


@triton.jit
def _inv_rms(x, inv_d, eps, CUDA: tl.constexpr, AXIS: tl.constexpr = 0):
    """(mean(x^2) + eps) ** -0.5 along AXIS of float32 x (zeros where masked)."""
    ms = tl.sum(x * x, axis=AXIS) * inv_d + eps
    if CUDA:
        return libdevice.rsqrt(ms)  # torch.pow(x, -0.5) on CUDA is rsqrt
    else:
        return 1.0 / tl.sqrt_rn(ms)  # and on the CPU 1 / sqrt, both correctly rounded


@triton.jit
def _load_row(ptr, row, width, offs, mask):
    return tl.load(ptr + row.to(tl.int64) * width + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _attention_tail_kernel(
    attn_ptr,  # [N, D] o_proj output
    residual_ptr,  # [N, D]
    post_w_ptr,  # [D] post_attention_layernorm
    pre_w_ptr,  # [D] pre_feedforward_layernorm
    pre2_w_ptr,  # [D] pre_feedforward_layernorm_2
    scale_ptr,  # [D] router.scale
    hidden_ptr,  # [N, D] out
    mlp_in_ptr,  # [N, D] out
    moe_in_ptr,  # [N, D] out
    router_in_ptr,  # [N, D] out
    width,
    inv_d,
    eps,
    router_root,
    CUDA: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < width
    dtype = hidden_ptr.dtype.element_ty
    a = _load_row(attn_ptr, row, width, offs, mask)
    post = tl.load(post_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = rounded(a * _inv_rms(a, inv_d, eps, CUDA) * post, dtype, ROUND_BF16)
    hidden = rounded(_load_row(residual_ptr, row, width, offs, mask) + normed, dtype, ROUND_BF16)
    base = row.to(tl.int64) * width + offs
    tl.store(hidden_ptr + base, to_elem(hidden, dtype, ROUND_BF16), mask=mask)

    n = hidden * _inv_rms(hidden, inv_d, eps, CUDA)  # the three norms of hidden share its mean square
    pre = tl.load(pre_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(mlp_in_ptr + base, to_elem(n * pre, dtype, ROUND_BF16), mask=mask)
    pre2 = tl.load(pre2_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(moe_in_ptr + base, to_elem(n * pre2, dtype, ROUND_BF16), mask=mask)
    scale = tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scaled = rounded(rounded(n, dtype, ROUND_BF16) * scale, dtype, ROUND_BF16)
    tl.store(router_in_ptr + base, to_elem(scaled * router_root, dtype, ROUND_BF16), mask=mask)


@triton.jit
def _ffn_tail_kernel(
    dense_ptr,  # [N, D] dense MLP output
    experts_ptr,  # [N, D] experts output
    residual_ptr,  # [N, D]
    w1_ptr,  # [D] post_feedforward_layernorm_1
    w2_ptr,  # [D] post_feedforward_layernorm_2
    w_ptr,  # [D] post_feedforward_layernorm
    scalar_ptr,  # [1] layer_scalar
    next_w_ptr,  # [D] next layer's input_layernorm (HAS_NEXT)
    hidden_ptr,  # [N, D] out
    next_ptr,  # [N, D] out (HAS_NEXT)
    width,
    inv_d,
    eps,
    HAS_NEXT: tl.constexpr,
    CUDA: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < width
    dtype = hidden_ptr.dtype.element_ty
    d = _load_row(dense_ptr, row, width, offs, mask)
    w1 = tl.load(w1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t1 = rounded(d * _inv_rms(d, inv_d, eps, CUDA) * w1, dtype, ROUND_BF16)
    e = _load_row(experts_ptr, row, width, offs, mask)
    w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t2 = rounded(e * _inv_rms(e, inv_d, eps, CUDA) * w2, dtype, ROUND_BF16)
    mixed = rounded(t1 + t2, dtype, ROUND_BF16)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t3 = rounded(mixed * _inv_rms(mixed, inv_d, eps, CUDA) * w, dtype, ROUND_BF16)
    hidden = rounded(_load_row(residual_ptr, row, width, offs, mask) + t3, dtype, ROUND_BF16)
    scalar = tl.load(scalar_ptr).to(tl.float32)
    hidden = rounded(hidden * scalar, dtype, ROUND_BF16)
    base = row.to(tl.int64) * width + offs
    tl.store(hidden_ptr + base, to_elem(hidden, dtype, ROUND_BF16), mask=mask)
    if HAS_NEXT:
        next_w = tl.load(next_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nxt = hidden * _inv_rms(hidden, inv_d, eps, CUDA) * next_w
        tl.store(next_ptr + base, to_elem(nxt, dtype, ROUND_BF16), mask=mask)


@triton.jit
def _head_kernel(
    x_ptr,  # [R, d] rows = (batch, token, head), contiguous
    weight_ptr,  # [d] (HAS_WEIGHT)
    cos_ptr,  # [R / heads, d] (ROPE)
    sin_ptr,  # [R / heads, d] (ROPE)
    out_ptr,  # [R, d], or a KV cache [S, heads, C, d] (TO_CACHE)
    slot_ptr,  # [B] int64 cache slot of each batch row (TO_CACHE)
    pos_ptr,  # [B * tokens] int64 cache position of each token (TO_CACHE)
    num_rows,
    heads,
    head_dim,
    tokens,
    capacity,
    inv_d,
    eps,
    TO_CACHE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROPE: tl.constexpr,
    CUDA: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols[None, :] < head_dim)
    dtype = out_ptr.dtype.element_ty
    base = rows.to(tl.int64)[:, None] * head_dim
    x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [R, d]
    if NORM:
        r = _inv_rms(x, inv_d, eps, CUDA, 1)[:, None]
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=cols < head_dim, other=0.0).to(tl.float32)[None, :]
            y = rounded(x * r * w, dtype, ROUND_BF16)
        else:
            y = rounded(x * r, dtype, ROUND_BF16)
    else:
        y = x
    if ROPE:
        # rotate_half(y)[i] = -y[i + d/2] for i < d/2, y[i - d/2] after: the partner columns, loaded again
        # (from L1) and normalised with the same factor, since a register tensor cannot be permuted.
        half = head_dim // 2
        partner = tl.where(cols < half, cols + half, cols - half)
        xp = tl.load(x_ptr + base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            if HAS_WEIGHT:
                wp = tl.load(weight_ptr + partner, mask=cols < head_dim, other=0.0).to(tl.float32)[None, :]
                yp = rounded(xp * r * wp, dtype, ROUND_BF16)
            else:
                yp = rounded(xp * r, dtype, ROUND_BF16)
        else:
            yp = xp
        yp = tl.where(cols[None, :] < half, -yp, yp)
        trig = (rows // heads).to(tl.int64)[:, None] * head_dim + cols[None, :]
        c = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
        y = rounded(y * c, dtype, ROUND_BF16) + rounded(yp * s, dtype, ROUND_BF16)
    if TO_CACHE:  # row (b, t, h) goes to cache[slot[b], h, pos[b, t]]: the KV write, without index_put
        token = rows // heads  # b * tokens + t
        slot = tl.load(slot_ptr + token // tokens, mask=row_ok, other=0)
        pos = tl.load(pos_ptr + token, mask=row_ok, other=0)
        dst = ((slot * heads + rows % heads) * capacity + pos) * head_dim  # [R] int64
    else:
        dst = rows.to(tl.int64) * head_dim
    tl.store(out_ptr + dst[:, None] + cols[None, :], to_elem(y, dtype, ROUND_BF16), mask=mask)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _row_launch(width: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of a row program over `width` elements."""
    block = triton.next_power_of_2(width)
    return block, max(1, min(16, block // 512))


def attention_tail_triton(
    attn_out, residual, post_weight, pre_weight, pre2_weight, router_scale, router_root, eps, *, out=None
):
    """`out`: preallocated (hidden, mlp_in, moe_in, router_in), else new tensors."""
    num, width = attn_out.shape
    outs = out or tuple(torch.empty_like(residual) for _ in range(4))
    if num:
        block, warps = _row_launch(width)
        _attention_tail_kernel[(num,)](
            attn_out, residual, post_weight, pre_weight, pre2_weight, router_scale, *outs,
            width, _f32(1.0 / width), float(eps), float(router_root),
            **device_flags(residual), BLOCK_D=block, num_warps=warps,
        )  # fmt: skip
    return outs


def ffn_tail_triton(
    dense, experts, residual, weight_1, weight_2, weight, layer_scalar, eps, next_weight=None, *, out=None
):
    """`out`: preallocated (hidden, next input or None), else new tensors."""
    num, width = residual.shape
    hidden, nxt = out or (
        torch.empty_like(residual),
        torch.empty_like(residual) if next_weight is not None else None,
    )
    if num:
        block, warps = _row_launch(width)
        _ffn_tail_kernel[(num,)](
            dense, experts, residual, weight_1, weight_2, weight, layer_scalar,
            next_weight if next_weight is not None else weight, hidden, nxt if nxt is not None else hidden,
            width, _f32(1.0 / width), float(eps),
            HAS_NEXT=next_weight is not None, **device_flags(residual), BLOCK_D=block, num_warps=warps,
        )  # fmt: skip
    return hidden, nxt


def head_norm_rope_triton(x, weight, cos, sin, eps, *, out=None, cache=None, slots=None, positions=None):
    """x [B, T, H, d]; cos/sin [B, T, d] or None. Returns a new [B, T, H, d] result (or fills `out`, a
    preallocated contiguous one); with `cache` [S, H, C, d], `slots` [B] and `positions` [B, T] (int64),
    writes row (b, t, h) to cache[slots[b], h, positions[b, t]] instead and returns the cache."""
    batch, tokens, heads, head_dim = x.shape
    rows = batch * tokens * heads
    flat = x.contiguous().reshape(rows, head_dim)  # rows exactly head_dim apart
    to_cache = cache is not None
    if to_cache:
        out, capacity = cache, cache.shape[2]
        slots, positions = slots.contiguous(), positions.contiguous()
    else:
        capacity = 0
        slots = positions = flat  # unused
        if out is None:
            out = torch.empty(batch, tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    if rows:
        block_d = triton.next_power_of_2(head_dim)
        block_r = max(1, min(triton.next_power_of_2(rows), HEAD_BLOCK_ELEMENTS // block_d))
        rope = cos is not None
        if rope:
            cos, sin = cos.contiguous(), sin.contiguous()
        _head_kernel[(triton.cdiv(rows, block_r),)](
            flat, weight if weight is not None else flat, cos if rope else flat, sin if rope else flat, out,
            slots, positions, rows, heads, head_dim, tokens, capacity, _f32(1.0 / head_dim),
            float(eps) if eps is not None else 0.0, TO_CACHE=to_cache, NORM=eps is not None, HAS_WEIGHT=weight is not None, ROPE=rope, **device_flags(x),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_d <= 4096 else block_d // 1024,
        )  # fmt: skip
    return out
