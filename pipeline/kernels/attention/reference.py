"""Pure-torch canvas attention: the semantics of the fused kernel (triton_attention.py).

The decoder's queries of a row (its canvas, T positions, H heads) attend bidirectionally to the keys of the
row's KV-cache slot in one range of positions [lo, hi): the cached prefix (all of it on full layers, the last
sliding_window - 1 tokens on sliding ones) and the canvas itself, whose keys were written at the end of the
slot. Heads share key/value heads in groups of H / H_kv (GQA).

  out[b, t, h] = softmax_{lo_b <= j < hi_b}(scale * q[b, t, h] . K[slot_b, h // G, j]) @ V[slot_b, h // G, :]

This reference reads positions [0, kv_limit) of the gathered slots with a boolean mask, through
scaled_dot_product_attention (with a mask and GQA, its math path), exactly as the model always has.

causal_attention_reference is the encoder's: causal over the slot, within the row's valid tokens and, on
sliding layers, the window (the kernel's CAUSAL mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def canvas_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    scale: float,
    prefix: bool = False,
    kv_limit: int | None = None,
) -> torch.Tensor:
    """q [B, T, H, d]; keys/values [S, H_kv, C, d]; slots, lo, hi [B] int64 -> [B, T, H, d].

    `prefix=True` promises slots == 0..B-1 (the cache is sliced instead of gathered); attention reads the
    first `kv_limit` positions (default: the capacity), which must cover every hi."""
    batch = q.shape[0]
    limit = kv_limit or keys.shape[2]
    if prefix:
        k_all, v_all = keys[:batch, :, :limit], values[:batch, :, :limit]
    else:
        k_all, v_all = keys[slots, :, :limit], values[slots, :, :limit]
    kv_pos = torch.arange(limit, device=q.device)[None, :]  # [1, C]
    mask = (kv_pos >= lo[:, None]) & (kv_pos < hi[:, None])  # [B, C]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_all,
        v_all,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=k_all.shape[1] != q.shape[2],
    )  # [B, H, T, d]
    return out.transpose(1, 2)


def causal_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    qpos: torch.Tensor,
    valid: torch.Tensor,
    *,
    window: int | None,
    scale: float,
    prefix: bool = False,
    kv_limit: int | None = None,
) -> torch.Tensor:
    """The encoder's attention: query t of row b sits at position p = qpos[b] + t of slot slots[b] and sees
    the keys j <= p with j < valid[b] (the row's valid tokens; a padded query also sees itself, so that no
    softmax row is empty), and with a `window` only j > p - window. q [B, T, H, d] -> [B, T, H, d]; reads the
    first `kv_limit` positions (default: the capacity) of the gathered (prefix: sliced) slots."""
    batch, tokens = q.shape[:2]
    limit = kv_limit or keys.shape[2]
    if prefix:
        k_all, v_all = keys[:batch, :, :limit], values[:batch, :, :limit]
    else:
        k_all, v_all = keys[slots, :, :limit], values[slots, :, :limit]
    positions = qpos[:, None] + torch.arange(tokens, device=q.device)[None, :]  # [B, T]
    kv_pos = torch.arange(limit, device=q.device)[None, None, :]  # [1, 1, C]
    causal = (kv_pos <= positions[:, :, None]) & (kv_pos < valid[:, None, None])
    if window is not None:
        causal &= kv_pos > positions[:, :, None] - window
    mask = causal | (kv_pos == positions[:, :, None])  # [B, T, C]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_all,
        v_all,
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=k_all.shape[1] != q.shape[2],
    )  # [B, H, T, d]
    return out.transpose(1, 2)
