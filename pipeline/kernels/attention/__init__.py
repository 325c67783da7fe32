"""Canvas attention: the decoder's queries over one key range per row of the KV cache, and the encoder's causal
attention over the slot. `canvas_attention(..., backend=...)` and `causal_attention` dispatch to the torch
reference (scaled_dot_product_attention with a mask) or the fused Triton kernel; both take and return the same
things (see reference.py)."""

from __future__ import annotations

import torch

from pipeline.kernels.attention.reference import canvas_attention_reference, causal_attention_reference


def canvas_attention(
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
    backend: str = "torch",
) -> torch.Tensor:
    """q [B, T, H, d]; keys/values [S, H_kv, C, d]; slots, lo, hi [B] int64 -> [B, T, H, d]. Row b attends to
    positions lo[b] <= j < hi[b] of slot slots[b] (clipped to [0, C); an empty range gives zeros). `prefix` and `kv_limit` only shape the reference's read
    (the kernel reads exactly [lo, hi))."""
    _check_inputs(q, keys, values, slots, lo, hi)
    if backend == "torch":
        return canvas_attention_reference(
            q, keys, values, slots, lo, hi, scale=scale, prefix=prefix, kv_limit=kv_limit
        )
    if backend == "triton":
        from pipeline.kernels.attention.triton_attention import canvas_attention_triton

        capacity = keys.shape[2]  # the kernel reads exactly [lo, hi) of the slot: keep it inside the slot
        lo, hi = lo.clamp(min=0), hi.clamp(max=capacity)
        return canvas_attention_triton(q.contiguous(), keys, values, slots, lo, hi, scale=scale)
    raise ValueError(f"backend={backend!r} is not one of torch, triton")


def causal_attention(
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
    backend: str = "torch",
) -> torch.Tensor:
    """The encoder's causal attention (see reference.causal_attention_reference): q [B, T, H, d] at positions
    qpos[b] + t of slot slots[b], keys/values [S, H_kv, C, d], qpos and valid [B] int64 -> [B, T, H, d]. The
    queries' positions must lie in the slot (qpos + T <= C). `prefix` and `kv_limit` only shape the
    reference's read."""
    _check_inputs(q, keys, values, slots, qpos, valid, ("qpos", "valid"))
    if window is not None and window < 1:
        raise ValueError(
            f"window={window} must be a positive number of positions, or None for full attention"
        )
    if backend == "torch":
        return causal_attention_reference(
            q, keys, values, slots, qpos, valid, window=window, scale=scale, prefix=prefix, kv_limit=kv_limit
        )
    if backend == "triton":
        from pipeline.kernels.attention.triton_attention import canvas_attention_triton

        lo = torch.zeros_like(qpos) if window is None else (qpos - (window - 1)).clamp(min=0)
        hi = (qpos + q.shape[1]).clamp(max=keys.shape[2])  # queries past the slot read nothing past it
        return canvas_attention_triton(
            q.contiguous(), keys, values, slots, lo, hi, scale=scale, causal=(qpos, valid, window)
        )
    raise ValueError(f"backend={backend!r} is not one of torch, triton")


def _check_inputs(q, keys, values, slots, lo, hi, names: tuple[str, str] = ("lo", "hi")) -> None:
    if q.ndim != 4 or keys.ndim != 4 or keys.shape != values.shape:
        raise ValueError(
            f"q must be [B, T, H, d] and keys/values [S, H_kv, C, d] alike; got {tuple(q.shape)}, "
            f"{tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if keys.shape[3] != q.shape[3] or q.shape[2] % keys.shape[1]:
        raise ValueError(
            f"head size {q.shape[3]} vs {keys.shape[3]}, or {q.shape[2]} query heads not a multiple of "
            f"{keys.shape[1]} key/value heads"
        )
    for name, t in (("slots", slots), (names[0], lo), (names[1], hi)):
        if t.shape != (q.shape[0],) or t.dtype != torch.int64 or t.device != q.device:
            raise ValueError(
                f"{name} must be int64 [B]={q.shape[0]} on {q.device}; got {t.dtype} {tuple(t.shape)}"
            )
    if not q.dtype == keys.dtype == values.dtype:
        raise ValueError(
            f"q, keys and values must share a dtype; got {q.dtype}, {keys.dtype}, {values.dtype}"
        )
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("the key/value cache tensors must be contiguous [S, H_kv, C, d]")


__all__ = ["canvas_attention", "canvas_attention_reference", "causal_attention", "causal_attention_reference"]
