"""RMS norms of a DiffusionGemma layer, fused: `attention_tail`, `ffn_tail`, `head_norm_rope` and `rms_norm`
dispatch to the pure-torch reference (reference.py, transformers' op order) or the Triton kernels
(triton_norms.py) by `backend`; both take and return the same things."""

from __future__ import annotations

import torch

from pipeline.kernels.norms import reference

# The fused kernels hold a whole row (or head) in one program: up to this many elements.
MAX_ROW = 16384


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend={backend!r} is not one of torch, triton")


def _check_rows(
    name: str, width: int, optional: tuple[str, ...] = (), **tensors: torch.Tensor | None
) -> None:
    """Every tensor is [N, width] (or [width] for weights: names ending in _weight / scale) and contiguous,
    the [N, width] ones of one dtype; only the `optional` ones may be None."""
    if width > MAX_ROW:
        raise ValueError(f"{name}: rows of {width} exceed the fused kernels' {MAX_ROW}; use backend='torch'")
    shape = None
    vectors = ("weight", "scale", "weight_1", "weight_2")  # weights may be of another dtype (read as float32)
    dtypes = {t.dtype for arg, t in tensors.items() if t is not None and not arg.endswith(vectors)}
    if len(dtypes) > 1:
        raise ValueError(f"{name}: inputs must share one dtype; got {sorted(str(d) for d in dtypes)}")
    for arg, t in tensors.items():
        if t is None:
            if arg not in optional:
                raise ValueError(f"{name}: {arg} is required by the fused kernel; got None")
            continue
        vector = arg.endswith(vectors)
        want = (width,) if vector else None
        if vector and tuple(t.shape) != want:
            raise ValueError(f"{name}: {arg} must be [{width}]; got {tuple(t.shape)}")
        if not vector:
            if t.ndim != 2 or t.shape[1] != width or (shape is not None and t.shape != shape):
                raise ValueError(f"{name}: {arg} must be [N, {width}] like the others; got {tuple(t.shape)}")
            shape = t.shape
        if not t.is_contiguous():
            raise ValueError(
                f"{name}: {arg} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
            )


def attention_tail(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    pre_weight: torch.Tensor,
    pre2_weight: torch.Tensor,
    router_scale: torch.Tensor,
    router_root: float,
    eps: float,
    *,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn_out, residual [N, D] -> (hidden, dense MLP input, experts input, router input) [N, D]."""
    _check_backend(backend)
    args = (attn_out, residual, post_weight, pre_weight, pre2_weight, router_scale, router_root, eps)
    if backend == "torch":
        return reference.attention_tail(*args)
    _check_rows(
        "attention_tail", residual.shape[-1], attn_out=attn_out, residual=residual, post_weight=post_weight,
        pre_weight=pre_weight, pre2_weight=pre2_weight, router_scale=router_scale,
    )  # fmt: skip
    from pipeline.kernels.norms.triton_norms import attention_tail_triton

    return attention_tail_triton(*args)


def ffn_tail(
    dense: torch.Tensor,
    experts: torch.Tensor,
    residual: torch.Tensor,
    weight_1: torch.Tensor,
    weight_2: torch.Tensor,
    weight: torch.Tensor,
    layer_scalar: torch.Tensor,
    eps: float,
    next_weight: torch.Tensor | None = None,
    *,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dense, experts, residual [N, D] -> (hidden [N, D], next layer's input norm of it [N, D] or None)."""
    _check_backend(backend)
    args = (dense, experts, residual, weight_1, weight_2, weight, layer_scalar, eps, next_weight)
    if backend == "torch":
        return reference.ffn_tail(*args)
    _check_rows(
        "ffn_tail", residual.shape[-1], ("next_weight",), dense=dense, experts=experts, residual=residual, weight_1=weight_1,
        weight_2=weight_2, weight=weight, next_weight=next_weight,
    )  # fmt: skip
    if layer_scalar.numel() != 1:
        raise ValueError(f"ffn_tail: layer_scalar must hold one value; got shape {tuple(layer_scalar.shape)}")
    from pipeline.kernels.norms.triton_norms import ffn_tail_triton

    return ffn_tail_triton(*args)


def _check_heads(x: torch.Tensor, weight, cos, sin) -> None:
    """The inputs of the fused per-head kernel: x [B, T, H, d], weight [d], cos/sin [B, T, d] of x's dtype."""
    if x.ndim != 4:
        raise ValueError(f"head_norm_rope: x must be [B, T, H, d]; got {tuple(x.shape)}")
    batch, tokens, _, head_dim = x.shape
    if (cos is None) != (sin is None):
        raise ValueError("head_norm_rope: give both cos and sin, or neither")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"head_norm_rope: {name} must be {x.dtype} like x; got {t.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and tuple(t.shape) != (batch, tokens, head_dim):
            raise ValueError(
                f"head_norm_rope: {name} must be [{batch}, {tokens}, {head_dim}]; got {tuple(t.shape)}"
            )
    if head_dim > MAX_ROW:
        raise ValueError(
            f"head_norm_rope: rows of {head_dim} exceed the fused kernels' {MAX_ROW}; use backend='torch'"
        )
    if cos is not None and head_dim % 2:
        raise ValueError(f"head_norm_rope: head_dim {head_dim} must be even for the rotary embedding")
    if weight is not None and tuple(weight.shape) != (head_dim,):
        raise ValueError(f"head_norm_rope: weight must be [{head_dim}]; got {tuple(weight.shape)}")


def head_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float | None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """x [B, T, H, d] -> [B, T, H, d]: per-head RMS norm (eps None: none; weight None: unscaled), then the
    rotary embedding with cos/sin [B, T, d] (None: none)."""
    _check_backend(backend)
    if backend == "torch":
        return reference.head_norm_rope(x, weight, cos, sin, eps)
    _check_heads(x, weight, cos, sin)
    from pipeline.kernels.norms.triton_norms import head_norm_rope_triton

    return head_norm_rope_triton(x, weight, cos, sin, eps)


def head_norm_rope_to_cache(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float | None,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """head_norm_rope of x [B, T, H, d] stored into cache [S, H, C, d] at [slots[b], h, positions[b, t]]
    (the keys or values of a KV cache); returns the cache. The Triton kernel writes there directly."""
    _check_backend(backend)
    if x.ndim != 4:
        raise ValueError(f"head_norm_rope_to_cache: x must be [B, T, H, d]; got {tuple(x.shape)}")
    batch, tokens, heads, head_dim = x.shape
    if cache.ndim != 4 or cache.shape[1] != heads or cache.shape[3] != head_dim or cache.dtype != x.dtype:
        raise ValueError(
            f"head_norm_rope_to_cache: cache must be [S, {heads}, C, {head_dim}] {x.dtype}; got "
            f"{cache.dtype} {tuple(cache.shape)}"
        )
    if slots.shape != (batch,) or positions.shape != (batch, tokens):
        raise ValueError(
            f"head_norm_rope_to_cache: slots must be [{batch}] and positions [{batch}, {tokens}]; got "
            f"{tuple(slots.shape)} and {tuple(positions.shape)}"
        )
    if backend == "torch":
        return reference.head_norm_rope_to_cache(x, weight, cos, sin, eps, cache, slots, positions)
    if not cache.is_contiguous() or slots.dtype != torch.int64 or positions.dtype != torch.int64:
        raise ValueError("head_norm_rope_to_cache: the cache must be contiguous, slots and positions int64")
    _check_heads(x, weight, cos, sin)
    from pipeline.kernels.norms.triton_norms import head_norm_rope_triton

    return head_norm_rope_triton(x, weight, cos, sin, eps, cache=cache, slots=slots, positions=positions)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, backend: str = "torch"
) -> torch.Tensor:
    """[..., D] -> [..., D]: transformers' DiffusionGemmaRMSNorm (weight None: with_scale=False)."""
    _check_backend(backend)
    if backend == "torch":
        return reference.rms_norm(x, weight, eps)
    shape = x.shape
    out = head_norm_rope(x.reshape(1, -1, 1, shape[-1]), weight, None, None, eps, backend=backend)
    return out.reshape(shape)


__all__ = ["attention_tail", "ffn_tail", "head_norm_rope", "head_norm_rope_to_cache", "rms_norm"]
