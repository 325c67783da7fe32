"""Pure-torch RMS norms of a DiffusionGemma layer, in the op order of transformers' modules: the semantics the
fused kernels (triton_norms.py) reproduce. Every `rms_norm` result is rounded to the input's dtype, as
`DiffusionGemmaRMSNorm.forward` does (`type_as`), and so is every sum and product between them, as torch does
for tensors of that dtype.

  rms_norm(x, w)      = (x * (mean(x^2) + eps) ** -0.5 * w)           float32 inside, rounded to x's dtype
  attention_tail      : hidden = residual + post_attention_norm(attn_out), then the three inputs of the
                        feed-forward half, which all normalise `hidden`: pre_feedforward_norm (dense MLP),
                        pre_feedforward_norm_2 (experts) and the router's unscaled norm * scale * D**-0.5
  ffn_tail            : hidden = (residual + post_ff_norm(post_ff_norm_1(dense) + post_ff_norm_2(experts)))
                        * layer_scalar, and optionally the next layer's input norm of it
  head_norm_rope      : per attention head, rms_norm over head_dim, then the rotary embedding
                        x * cos + rotate_half(x) * sin (cos, sin: [B, T, head_dim]); either step optional;
                        head_norm_rope_to_cache writes the result into a KV cache's slots and positions
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' DiffusionGemmaRMSNorm over the last dimension (`weight` None: with_scale=False)."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def attention_tail(
    attn_out: torch.Tensor,
    residual: torch.Tensor,
    post_weight: torch.Tensor,
    pre_weight: torch.Tensor,
    pre2_weight: torch.Tensor,
    router_scale: torch.Tensor,
    router_root: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, D] each -> (hidden, dense MLP input, experts input, router input), all [N, D] in x's dtype."""
    hidden = residual + rms_norm(attn_out, post_weight, eps)
    router_in = rms_norm(hidden, None, eps) * router_scale * router_root
    return hidden, rms_norm(hidden, pre_weight, eps), rms_norm(hidden, pre2_weight, eps), router_in


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, D] each -> (hidden, next layer's normed input or None). `layer_scalar` [1] multiplies in place in
    transformers, so the product is rounded to hidden's dtype whatever the scalar's dtype."""
    mixed = rms_norm(dense, weight_1, eps) + rms_norm(experts, weight_2, eps)
    hidden = residual + rms_norm(mixed, weight, eps)
    hidden = (hidden * layer_scalar).to(hidden.dtype)
    return hidden, (rms_norm(hidden, next_weight, eps) if next_weight is not None else None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def head_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float | None,
) -> torch.Tensor:
    """x [B, T, H, d]; cos/sin [B, T, d] or None (no rotary embedding); eps None: no norm."""
    if eps is not None:
        x = rms_norm(x, weight, eps)
    if cos is None:
        return x
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def head_norm_rope_to_cache(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float | None,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """head_norm_rope of x [B, T, H, d] written to cache [S, H, C, d] at [slots[b], :, positions[b, t]]."""
    cache[slots[:, None], :, positions] = head_norm_rope(x, weight, cos, sin, eps)
    return cache
