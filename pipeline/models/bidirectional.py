"""The bidirectional LLaMA-like transformer of mask-diffusion LMs (LLaDA, Dream): tokens in, hidden states out.

One native module serves both families; they differ only in parameter names, config keys, q/k/v biases and
Dream's one-position logit shift (llada.py and dream.py map their checkpoints onto it). The model never
samples. Every query attends to every valid key of its row (no causal mask), at per-row positions, so a
row's numbers never depend on its neighbours in the batch.

- Without a cache (`cache=None`) a call sees only its own tokens: the exact path, where the sampler runs the
  whole sequence (prompt + generated region) every step, as LLaDA's `generate` does.
- With a `BlockKVCache` ([slots, kv_heads, capacity, head_dim] per layer, allocated once) a call writes the
  keys/values of its tokens at their positions in the row's slot, then attends to the slot's positions
  [0, key_length): tokens computed earlier are read from the cache. The sampler's block-caching modes are
  just choices of which window to recompute (see pipeline/sampler/mask/engine.py). That attention is
  kernels/attention's canvas attention over the key range [0, key_length) of each row's slot: on the Triton
  backend (`set_backend`, which the mask sampler calls) a flash attention reading the cache in place; on the
  torch backend scaled_dot_product_attention with a mask over the gathered slots, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels.attention import canvas_attention
from pipeline.kernels.backend import check_backend, resolve_backend

# Query windows are padded to a multiple of this, so that no dense product sees very few rows (CPU GEMM kernels
# can change their reduction order for tiny row counts, see models.diffusion_gemma). 8 rather than 16: a dual-
# cache step computes only the block, and tiny models use blocks of 8.
TOKEN_PAD = 8


@dataclass(frozen=True)
class MaskLMSpec:
    """Architecture of a mask-diffusion LM, in canvasflow's terms (families translate their config keys)."""

    family: str  # "llada" or "dream"
    vocab_size: int  # rows of the embedding and of the head
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool
    mask_token_id: int
    shift_logits: bool  # Dream: the logits of position p are read from the hidden state of p - 1
    context_window: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} kv heads")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask token id {self.mask_token_id} is outside the vocabulary ({self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_params(self) -> int:
        """Weights of the per-token dense products of all layers (for FLOP counts: 2 FLOPs per weight)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * d + 2 * d * self.num_kv_heads * hd + d * d
        return self.num_layers * (attn + 3 * d * self.intermediate_size)


class BlockKVCache:
    """Keys and values per layer, [slots, kv_heads, capacity, head_dim], post-RoPE.

    The last column is scratch: padded queries write there, and no attention ever reads it (callers attend to
    [0, key_span) with key_span < capacity). Every column holds finite numbers, so masked weights stay zero.
    """

    def __init__(
        self, spec: MaskLMSpec, slots: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (slots, spec.num_kv_heads, capacity, spec.head_dim)
        self.slots = slots
        self.capacity = capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def scratch(self) -> int:
        return self.capacity - 1

    def move(self, src: int, dst: int) -> None:
        """Copies slot `src` into slot `dst` (keeps active rows in a prefix of the slots)."""
        if src != dst:
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, result cast back before the weight (LLaDA's RMSLayerNorm and Dream's RMSNorm)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Layer(nn.Module):
    def __init__(self, spec: MaskLMSpec) -> None:
        super().__init__()
        d, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
        self.attn_norm = RMSNorm(d, spec.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, spec.rms_norm_eps)
        self.gate_proj = nn.Linear(d, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, d, bias=False)


def rope_inv_freq(spec: MaskLMSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/d), i < d/2, computed in float64 and stored in float32."""
    exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.float64, device=device) / spec.head_dim
    return (1.0 / spec.rope_theta**exponents).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BidirectionalLM(nn.Module):
    """Embedding, `num_layers` pre-norm blocks (bidirectional GQA attention with RoPE, SwiGLU MLP), final norm
    and the vocabulary head (tied to the embedding when the checkpoint says so)."""

    def __init__(self, spec: MaskLMSpec) -> None:
        super().__init__()
        self.spec = spec
        shape = (spec.vocab_size, spec.hidden_size)
        self.embed = nn.Embedding(*shape, _weight=torch.empty(shape))
        # Built on the meta device, the module is loading a checkpoint (mask_checkpoint.py): nn.Embedding's
        # normal_ and a float64 arange there would import torch._dynamo (1.7 s) for values never used.
        on_meta = self.embed.weight.device.type == "meta"
        if not on_meta:
            nn.init.normal_(self.embed.weight)
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = (
            None if spec.tie_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(spec, "cpu" if on_meta else None), persistent=False)
        self.backend = "torch"  # the cached attention's kernels: auto, torch or triton (set_backend)

    # ---------------------------------------------------------------------------------------- properties
    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def mask_token_id(self) -> int:
        return self.spec.mask_token_id

    @property
    def context_window(self) -> int:
        return self.spec.context_window

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def set_backend(self, backend: str) -> None:
        """Chooses the cached attention's kernels (auto: Triton on CUDA); the mask sampler passes its own."""
        self.backend = check_backend(backend)

    def kernel_backend(self) -> str:
        return resolve_backend(self.backend, self.device.type)

    def new_cache(self, slots: int, capacity: int) -> BlockKVCache:
        return BlockKVCache(self.spec, slots, capacity, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        *,
        cache: BlockKVCache | None = None,
        slots: torch.Tensor | None = None,
        key_length: torch.Tensor | None = None,
        key_span: int | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, W, D] of `tokens` [B, W] at `positions` [B, W] (`valid` [B, W] marks
        real tokens; padded queries are computed and ignored).

        Without a cache the keys are this call's valid tokens. With one, row b lives in cache slot slots[b]
        (slots=None: slot b, read through a view): its valid tokens' keys/values are written at their positions,
        then it attends to slot positions [0, key_length[b]); `key_span` (a host int >= max key_length) bounds
        the columns read.
        """
        batch, width = tokens.shape
        x = self.embed(tokens)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, W, d/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, W, 1, d]
        cos, sin = angles.cos(), angles.sin()
        if cache is None:
            mask = valid[:, None, None, :]  # [B, 1, 1, W]
            write = None
        else:
            if key_length is None or key_span is None or not 0 < key_span < cache.capacity:
                raise ValueError(
                    f"a cached forward needs key_length and 0 < key_span < capacity={cache.capacity}; "
                    f"got key_span={key_span}"
                )
            write = torch.where(valid, positions, cache.scratch)  # [B, W]
            cache_slots = torch.arange(batch, device=tokens.device) if slots is None else slots
            rows = cache_slots[:, None]
            starts = torch.zeros_like(key_length)  # every row attends to its slot's positions [0, key_length)
            backend = self.kernel_backend()
        spec = self.spec
        scale = 1.0 / math.sqrt(spec.head_dim)
        for i, layer in enumerate(self.layers):
            h = layer.attn_norm(x)
            q = self._rope(layer.q_proj(h).view(batch, width, spec.num_heads, spec.head_dim), cos, sin)
            k = self._rope(layer.k_proj(h).view(batch, width, spec.num_kv_heads, spec.head_dim), cos, sin)
            v = layer.v_proj(h).view(batch, width, spec.num_kv_heads, spec.head_dim)
            if cache is None:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    k.transpose(1, 2),  # [B, Hkv, W, d]
                    v.transpose(1, 2),
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=spec.num_kv_heads != spec.num_heads,
                ).transpose(1, 2)  # [B, W, H, d]
            else:
                keys, values = cache.keys[i], cache.values[i]
                keys[rows, :, write] = k  # [B, W, Hkv, d] into [S, Hkv, C, d]
                values[rows, :, write] = v
                out = canvas_attention(
                    q, keys, values, cache_slots, starts, key_length, scale=scale, prefix=slots is None,
                    kv_limit=key_span, backend=backend,
                )  # fmt: skip
            x = x + layer.o_proj(out.reshape(batch, width, -1))
            h = layer.mlp_norm(x)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        return self.norm(x)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [B, W, H, d], rotated in float32 (LLaDA's rope_full_precision) and cast back
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * cos.to(xf.dtype) + _rotate_half(xf) * sin.to(xf.dtype)).to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [..., V] of hidden states [..., D]: the product in the weights' dtype, returned in
        float32 (float64 for a float64 model)."""
        out = F.linear(hidden, self.head_weight)
        return out.to(torch.promote_types(out.dtype, torch.float32))
