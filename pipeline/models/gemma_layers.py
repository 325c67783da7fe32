"""DiffusionGemma's text decoder as plain torch modules, for loading a checkpoint without transformers' modeling.

Importing transformers' DiffusionGemma modeling costs a worker 4-5 s of CPU (torch._dynamo, torch.distributed
and transformers' integrations come with it) before any weight is read. These modules hold the same
parameters under the same names as transformers' `DiffusionGemmaDecoderModel` (so a checkpoint's
`model.decoder.*` tensors load as they are) and expose the attributes `DiffusionGemmaTextModel` reads; the
orchestration (attention, caches, fused kernels) stays in diffusion_gemma.py and runs on either.
`tests/models/test_gemma_checkpoint.py` checks the loaded model against transformers' on the same files.
Built on the meta device by gemma_checkpoint.py, which assigns the checkpoint's tensors and then creates the
two non-persistent buffers (`init_buffers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.gemma_config import TextConfig

# Every name gemma_config.ACTIVATIONS accepts (tests/models/test_gemma_checkpoint.py checks the two agree).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """transformers' DiffusionGemmaRMSNorm: float32 x * (mean(x^2) + eps)^-0.5, times the weight if any."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            h = h * self.weight.float()
        return h.type_as(x)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense feed-forward block and the self-conditioning block's core."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SelfConditioning(GatedMLP):
    """post_norm(inputs + MLP(pre_norm(signal))), the signal being the previous pass's soft embeddings."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_activation)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, inputs: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.post_norm(inputs + super().forward(self.pre_norm(signal)))


class Attention(nn.Module):
    """Projections and norms of one attention layer; full-attention layers have no v_proj (keys are values)."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.head_dim = config.head_dims[layer_idx]
        kv_width = config.kv_heads[layer_idx] * self.head_dim
        width, bias = config.num_attention_heads * self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=bias) if self.is_sliding else None
        self.o_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)


class Router(nn.Module):
    """The experts' router weights (its computation is diffusion_gemma.route and the fused norms)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.scalar_root_size = config.hidden_size**-0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj [E, 2I, D], down_proj [E, D, I] (run by models/moe.py)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_experts = int(config.num_experts)
        experts, hidden, inner = self.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        self.act_fn = ACTIVATIONS[config.hidden_activation]


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
            "post_feedforward_layernorm",
        ):  # fmt: skip
            setattr(self, name, RMSNorm(hidden, eps))
        self.register_buffer("layer_scalar", torch.ones(1))


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden_size); the weight is also the (tied) vocabulary head."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__(vocab, hidden)
        self.scalar_embed_scale = hidden**0.5

    def reset_parameters(self) -> None:
        """None: the weight is assigned from the checkpoint, and nn.Embedding's normal_ on the meta device
        would import torch._dynamo (1.7 s)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin per layer type. "proportional" (DiffusionGemma's full layers) rotates the first
    partial_rotary_factor of each head's frequency pairs, with exponents over the whole head_dim, and leaves the
    others unrotated (frequency 0)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.params: dict[str, tuple[float, float, float, int]] = {}
        for layer_type, rope in config.rope_parameters.items():  # checked by gemma_config
            head_dim = config.head_dims[config.layer_types.index(layer_type)]
            partial = float(rope.get("partial_rotary_factor", 1.0))
            factor = float(rope.get("factor", 1.0)) if rope.get("rope_type") == "proportional" else 1.0
            self.params[layer_type] = (float(rope["rope_theta"]), partial, factor, head_dim)

    def init_buffers(self, device: torch.device | str) -> None:
        for layer_type, (theta, partial, factor, head_dim) in self.params.items():
            rotated = int(partial * head_dim // 2)
            exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64, device=device).float() / head_dim
            inv_freq = 1.0 / (theta**exponents)
            unrotated = head_dim // 2 - rotated
            if unrotated:
                inv_freq = torch.cat([inv_freq, torch.zeros(unrotated, device=device)])
            self.register_buffer(f"{layer_type}_inv_freq", inv_freq / factor, persistent=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        freqs = positions[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class TextDecoder(nn.Module):
    """The decoder's text weights under transformers' names (`model.decoder.` stripped)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.self_conditioning = SelfConditioning(config)

    def init_buffers(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """The buffers no checkpoint holds, made on `device` once the weights are in (built on meta). The
        embedding scale is rounded to the model's dtype, as transformers' is (built under that default dtype)."""
        scale = torch.tensor(self.embed_tokens.scalar_embed_scale, dtype=dtype, device=device)
        self.embed_tokens.register_buffer("embed_scale", scale, persistent=False)
        self.rotary_emb.init_buffers(device)
