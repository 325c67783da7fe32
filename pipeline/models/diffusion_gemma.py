"""DiffusionGemma's text model as the sampler needs it: hidden states in, no sampling.

The weights are transformers' own modules, or the same weights under the same names in gemma_layers' modules
(models/gemma_checkpoint.py loads a checkpoint into those without importing transformers' modeling); this
file owns the orchestration that `generate` does not offer:

- a static KV cache with one slot per batch row ([slots, kv_heads, capacity, head_dim] per layer), allocated
  once and reused as rows come and go (continuous batching);
- per-row positions, so a row's computation never depends on its neighbours (batch invariance);
- `encode`: the causal encoder writes a prompt or a finished canvas into a slot;
- `denoise`: the bidirectional decoder reads the slot's prefix and the canvas, writing nothing permanent.

Semantics follow transformers' DiffusionGemma: sliding layers see a causal window of `sliding_window`
tokens in the encoder, and the last `sliding_window - 1` prefix tokens plus the whole canvas in the decoder
(what its DynamicSlidingWindowLayer keeps); full layers see everything; attention scaling is 1 (q/k are
RMS-normed); full layers use k=v. `tests/models/test_diffusion_gemma.py` checks logits against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import attention, norms
from pipeline.kernels import experts as expert_kernels
from pipeline.kernels.backend import check_backend, resolve_backend
from pipeline.models.moe import check_gemm, moe_forward

# Prefill lengths are padded to a multiple of this, so every dense product sees at least this many rows:
# CPU GEMM kernels change their reduction order for very small row counts, which would make a row's
# numbers depend on how many rows share its batch.
TOKEN_PAD = 16


@dataclass(frozen=True)
class LayerSpec:
    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool


class Causal(NamedTuple):
    """The encoder's attention of one layer kind: queries at qpos[b] + t, keys below valid[b], a window or None
    (kernels/attention causal_attention)."""

    qpos: torch.Tensor
    valid: torch.Tensor
    window: int | None


class SlotKVCache:
    """Keys and values per layer, [slots, kv_heads, capacity, head_dim], and the cached length per slot.

    Positions at or beyond a slot's length hold scratch data (the canvas being denoised, prompt padding);
    attention masks them out, and they are always finite, so masked weights of exactly zero stay zero.
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.slots = slots
        self.capacity = capacity
        self.keys = [
            torch.zeros(slots, s.num_kv_heads, capacity, s.head_dim, dtype=dtype, device=device)
            for s in specs
        ]
        self.values = [
            torch.zeros(slots, s.num_kv_heads, capacity, s.head_dim, dtype=dtype, device=device)
            for s in specs
        ]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    def move(self, src: int, dst: int) -> None:
        """Copies slot `src` into slot `dst` (used to keep active rows in a prefix of the slots)."""
        if src == dst:
            return
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])
        self.lengths[dst] = self.lengths[src]

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copies the first lengths[i] cached positions of slot src[i] into slot dst[i] and sets its length
        (a prompt already encoded in another slot). One copy per layer, as wide as the longest: past a pair's
        own length it carries scratch data, which the destination's length masks out like any other."""
        width = int(lengths.max())
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :width] = k[src, :, :width]
            v[dst, :, :width] = v[src, :, :width]
        self.lengths[dst] = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


TIED_MESSAGE = (
    "canvasflow runs DiffusionGemma with tied weights (encoder = decoder, head = embedding; "
    "tie_word_embeddings=True) and cannot run this checkpoint"
)


@dataclass
class TextWeights:
    """What the text forward runs on: the decoder's modules (transformers' DiffusionGemmaDecoderModel, or
    gemma_layers.TextDecoder as models/gemma_checkpoint.py loads a checkpoint), its config, and the encoder's
    per-layer scalars [layers, 1] (its only values of its own in the tied layout)."""

    decoder: nn.Module
    text_config: Any
    canvas_length: int
    encoder_layer_scalars: torch.Tensor

    @classmethod
    def of_transformers(cls, hf_model: nn.Module) -> TextWeights:
        """The text weights of a transformers DiffusionGemmaForBlockDiffusion, shared with it (training runs the
        sampler on the weights it updates). ValueError for untied weights (_check_tied)."""
        _check_tied(hf_model)
        layers = hf_model.model.encoder.language_model.layers
        return cls(
            decoder=hf_model.model.decoder,
            text_config=hf_model.config.text_config,
            canvas_length=int(hf_model.config.canvas_length),
            encoder_layer_scalars=torch.stack([e.layer_scalar.detach().clone() for e in layers]),
        )


class DiffusionGemmaTextModel(nn.Module):
    """Encoder/decoder forward over a DiffusionGemma checkpoint's (shared) text weights: `model` is transformers'
    DiffusionGemmaForBlockDiffusion or TextWeights."""

    def __init__(
        self, model: nn.Module | TextWeights, *, backend: str = "auto", moe_gemm: str = "auto"
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.moe_gemm = check_gemm(moe_gemm)  # the grouped experts' products (models/moe.py)
        weights = model if isinstance(model, TextWeights) else TextWeights.of_transformers(model)
        decoder = weights.decoder
        text_config = weights.text_config
        if getattr(text_config, "use_bidirectional_attention", None) == "all":
            # transformers' encoder is then non-causal, with sliding_window rewritten to a two-sided bound
            # (window // 2 + 1); ours is causal. ("vision" only affects image tokens, which we never see.)
            raise ValueError(
                "use_bidirectional_attention='all' (a bidirectional encoder) is not supported: canvasflow's "
                "encoder is causal"
            )
        self.text_config = text_config
        self.canvas_length = weights.canvas_length
        self.embed_tokens = decoder.embed_tokens
        self.layers = decoder.layers
        # transformers ties every encoder weight to the decoder's but not the buffers: the encoder's per-layer
        # scalars are its own values in a checkpoint, so the causal encode path multiplies by those.
        self.register_buffer("encoder_layer_scalars", weights.encoder_layer_scalars, persistent=False)
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.self_conditioning = decoder.self_conditioning
        self.softcap = text_config.final_logit_softcapping
        self.sliding_window = int(text_config.sliding_window)
        self.num_heads = int(text_config.num_attention_heads)
        self.layer_types = list(text_config.layer_types)
        self.eps = float(text_config.rms_norm_eps)
        # The fused MLP / expert activations implement gelu-tanh, DiffusionGemma's activation; others stay in torch.
        self.gelu_tanh = getattr(text_config, "hidden_activation", None) == "gelu_pytorch_tanh"
        odd = [n for n, m in decoder.named_modules() if hasattr(m, "with_scale") and m.eps != self.eps]
        if odd:  # the fused norms take one eps per layer
            raise ValueError(f"RMS norms {odd[:3]} do not use the config's rms_norm_eps={self.eps}")
        self.specs = []
        for layer in self.layers:
            attn = layer.self_attn
            self.specs.append(
                LayerSpec(
                    sliding=attn.is_sliding,
                    head_dim=attn.head_dim,
                    num_kv_heads=attn.k_proj.out_features // attn.head_dim,
                    k_eq_v=attn.v_proj is None,
                )
            )
        # The widest row a fused norm kernel would hold (hidden size or a head); see kernel_backend.
        self._widest_row = max([int(text_config.hidden_size)] + [spec.head_dim for spec in self.specs])

    # ----------------------------------------------------------------------------------------------
    @property
    def embedding(self) -> torch.Tensor:
        """The tied embedding / vocabulary head, [V, D]."""
        return self.embed_tokens.weight

    @property
    def embed_scale(self) -> float:
        return float(self.embed_tokens.scalar_embed_scale)

    @property
    def vocab_size(self) -> int:
        return int(self.embed_tokens.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embed_tokens.weight.shape[1])

    @property
    def context_window(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def kernel_backend(self) -> str:
        """The kernels of this model's forward on its current device: "torch" or "triton" (torch where the
        rows are wider than the fused kernels hold)."""
        chosen = resolve_backend(self.backend, self.device.type)
        return "torch" if self._widest_row > norms.MAX_ROW else chosen

    def set_backend(self, backend: str) -> None:
        """Chooses the kernels of the forward (the sampler passes its own `backend` setting)."""
        self.backend = check_backend(backend)

    def set_moe_gemm(self, gemm: str) -> None:
        """The grouped experts' products: auto (Triton's on the Triton backend), grouped_mm or triton."""
        self.moe_gemm = check_gemm(gemm)

    def _moe_gemm(self, backend: str) -> str:
        return "grouped_mm" if backend == "torch" else self.moe_gemm

    def new_cache(self, slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(self.specs, slots, capacity, self.dtype, self.device)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        cache: SlotKVCache,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        prefix: bool = False,
        kv_limit: int | None = None,
    ) -> None:
        """Causally encodes `tokens` [B, T] (row b valid up to lengths[b]) after each slot's cached prefix,
        writing keys/values at positions cache.lengths[slot] + t, then advances the slot lengths. `prefix=True`
        promises that `slots` is 0..B-1, so the cache is sliced instead of gathered."""
        batch, width = tokens.shape
        start = cache.lengths[slots]  # [B]
        positions = start[:, None] + torch.arange(width, device=tokens.device)[None, :]  # [B, T]
        if int((start + width).max()) > cache.capacity:  # one sync per encode, not per step
            raise ValueError(
                f"KV cache capacity {cache.capacity} is too small for {int((start + width).max())} tokens"
            )
        valid_len = start + lengths  # [B]
        # Causal over the slot, restricted to the row's valid tokens (a padded query also sees itself, so that
        # no softmax row is empty); sliding layers within their window (kernels/attention causal_attention).
        masks = {
            "full": Causal(start, valid_len, None),
            "sliding": Causal(start, valid_len, self.sliding_window),
        }
        hidden = self.embed_tokens(tokens)
        self._run_layers(hidden, cache, slots, positions, masks, prefix, kv_limit or cache.capacity)
        cache.lengths[slots] = valid_len

    @torch.no_grad()
    def denoise(
        self,
        cache: SlotKVCache,
        slots: torch.Tensor,
        canvas: torch.Tensor,
        soft_embeddings: torch.Tensor | None,
        *,
        prefix: bool = False,
        kv_limit: int | None = None,
    ) -> torch.Tensor:
        """Decoder forward over `canvas` [B, L] attending bidirectionally to each slot's prefix and the canvas.

        `soft_embeddings` [B, L, D] is softmax(z) @ E of the previous step (zeros or None at the first step).
        Returns the final normed hidden states [B, L, D]; the cache lengths are unchanged.
        """
        batch, length = canvas.shape
        start = cache.lengths[slots]
        positions = start[:, None] + torch.arange(length, device=canvas.device)[None, :]
        # Every query of a row sees one range of its slot: the prefix (sliding layers: its last window - 1
        # tokens) and the canvas scratch after it. [B] each; the attention kernels build no mask from them.
        end = start + length
        ranges = {"full": (torch.zeros_like(start), end), "sliding": (start - (self.sliding_window - 1), end)}
        inputs = self.embed_tokens(canvas)
        if soft_embeddings is None:
            soft = torch.zeros_like(inputs)
        else:
            soft = soft_embeddings.to(inputs.dtype) * self.embed_tokens.embed_scale.to(inputs.dtype)
        hidden = self.self_conditioning(inputs, soft)
        return self._run_layers(hidden, cache, slots, positions, ranges, prefix, kv_limit or cache.capacity)

    # ----------------------------------------------------------------------------------------------
    def _run_layers(
        self,
        hidden: torch.Tensor,
        cache: SlotKVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[str, Causal | tuple[torch.Tensor, torch.Tensor]],
        prefix: bool,
        kv_limit: int,
    ) -> torch.Tensor:
        """Attention reads cache positions [0, kv_limit) (the whole capacity unless the caller knows that no
        active row reaches further). Both modes write this call's keys/values at `positions`: the encoder
        commits them (the caller advances the lengths), the decoder only fills the scratch region past the
        slot's length. `masks` per layer kind: the encoder's causal ranges (Causal), or the decoder's key
        ranges (lo, hi), one per row (canvas attention, kernels/attention). With the Triton backend the norms
        run fused (kernels/norms): each layer's input norm is computed by the previous layer's tail (the last
        tail computes the final norm), and the three norms of the feed-forward half share one pass."""
        backend = self.kernel_backend()
        eps = self.eps
        rope = {lt: self.rotary_emb(hidden, positions, lt) for lt in set(self.layer_types)}
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])  # [B*T, D]
        first = self.layers[0].input_layernorm
        x = norms.rms_norm(hidden, _scale(first), eps, backend=backend)
        encoding = isinstance(masks["full"], Causal)
        for i, layer in enumerate(self.layers):
            spec = self.specs[i]
            cos, sin = rope[self.layer_types[i]]
            mask = masks["sliding" if spec.sliding else "full"]
            attn_args = (cache, i, slots, positions, prefix, mask, kv_limit, backend)
            attn_out = self._attention(layer.self_attn, spec, x.view(shape), cos, sin, *attn_args)
            router = layer.router
            hidden, mlp_in, moe_in, router_in = norms.attention_tail(
                attn_out.reshape(hidden.shape), hidden, _scale(layer.post_attention_layernorm),
                _scale(layer.pre_feedforward_layernorm), _scale(layer.pre_feedforward_layernorm_2),
                router.scale, router.scalar_root_size, eps, backend=backend,
            )  # fmt: skip
            mlp_backend = backend if self.gelu_tanh else "torch"
            dense = _mlp(layer.mlp, mlp_in, mlp_backend)
            top_w, top_i = route(router, router_in)
            experts = moe_forward(
                layer.experts, moe_in, top_i, top_w, backend=mlp_backend, gemm=self._moe_gemm(mlp_backend)
            )
            next_norm = self.norm if i + 1 == len(self.layers) else self.layers[i + 1].input_layernorm
            hidden, x = norms.ffn_tail(
                dense, experts, hidden, _scale(layer.post_feedforward_layernorm_1),
                _scale(layer.post_feedforward_layernorm_2), _scale(layer.post_feedforward_layernorm),
                self.encoder_layer_scalars[i] if encoding else layer.layer_scalar, eps, _scale(next_norm),
                backend=backend,
            )  # fmt: skip
            if x is None:  # the next norm has no scale: the tail did not fuse it
                x = norms.rms_norm(hidden, None, eps, backend=backend)
        return x.view(shape)  # the final norm of the last hidden states

    def _attention(
        self,
        attn: nn.Module,
        spec: LayerSpec,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: SlotKVCache,
        layer_idx: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        prefix: bool,
        mask: Causal | tuple[torch.Tensor, torch.Tensor],
        kv_limit: int,
        backend: str,
    ) -> torch.Tensor:
        batch, width, _ = x.shape
        eps = self.eps
        q = attn.q_proj(x).view(batch, width, -1, spec.head_dim)
        q = norms.head_norm_rope(q, _scale(attn.q_norm), cos, sin, eps, backend=backend)
        k_raw = attn.k_proj(x).view(batch, width, -1, spec.head_dim)
        v = k_raw if spec.k_eq_v else attn.v_proj(x).view(batch, width, -1, spec.head_dim)
        keys, values = cache.keys[layer_idx], cache.values[layer_idx]
        # Normed (and rotated) keys and values go straight into the slots at `positions`: [B, T, Hkv, d] into
        # [S, Hkv, C, d] (the Triton kernel stores them there; the reference assigns by index).
        store = dict(slots=slots, positions=positions, backend=backend)
        norms.head_norm_rope_to_cache(k_raw, _scale(attn.k_norm), cos, sin, eps, keys, **store)
        norms.head_norm_rope_to_cache(v, _scale(attn.v_norm), None, None, eps, values, **store)
        if isinstance(mask, Causal):  # the encoder
            out = attention.causal_attention(
                q, keys, values, slots, mask.qpos, mask.valid, window=mask.window, scale=1.0, prefix=prefix,
                kv_limit=kv_limit, backend=backend,
            )  # fmt: skip
        else:  # the decoder: one key range per row
            lo, hi = mask
            out = attention.canvas_attention(
                q, keys, values, slots, lo, hi, scale=1.0, prefix=prefix, kv_limit=kv_limit, backend=backend
            )  # [B, T, H, d]
        return attn.o_proj(out.reshape(batch, width, -1))


def _check_tied(hf_model: nn.Module) -> None:
    """Our forward encodes with the decoder's weights and takes logits from the decoder's embedding: the
    layout transformers builds with tie_word_embeddings=True (the released checkpoints). With False it keeps
    the encoder's weights and lm_head apart, and a checkpoint may give them values of their own; running
    such a model here would silently compute another function, so it is refused. Weights that are not
    shared but equal are accepted (a tied checkpoint loaded untied). The encoder's final norm is not
    checked: its output is never used (the decoder reads only the encoder's keys and values)."""
    decoder = hf_model.model.decoder
    twins = dict(decoder.named_parameters())
    pairs = [("lm_head.weight", hf_model.lm_head.weight, decoder.embed_tokens.weight)]
    for name, param in hf_model.model.encoder.language_model.named_parameters():
        if name != "norm.weight":
            pairs.append((f"encoder {name}", param, twins.get(name)))
    for name, ours, theirs in pairs:
        same = theirs is not None and (
            ours is theirs
            or (ours.shape == theirs.shape and ours.data_ptr() == theirs.data_ptr())
            or (ours.shape == theirs.shape and torch.equal(ours, theirs))
        )
        if not same:
            raise ValueError(f"{name} differs from the decoder's weight: {TIED_MESSAGE}")


def _scale(norm: nn.Module) -> torch.Tensor | None:
    """The weight of a DiffusionGemmaRMSNorm, None for one without (with_scale=False)."""
    return norm.weight if getattr(norm, "with_scale", True) else None


def _mlp(mlp: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """transformers' DiffusionGemmaText4MLP, with its gelu-tanh and product fused on the Triton backend."""
    if backend == "torch":
        return mlp(x)
    return mlp.down_proj(expert_kernels.gelu_mul(mlp.gate_proj(x), mlp.up_proj(x), backend=backend))


def route(router: nn.Module, router_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DiffusionGemmaTextRouter after its input scaling (norm * scale * D**-0.5, which
    norms.attention_tail computes): top-k weights [N, k] float32 and expert ids [N, k]."""
    probs = F.softmax(router.proj(router_in), dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, k=router.config.top_k_experts, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w * router.per_expert_scale[top_i], top_i


def softcapped_logits(hidden: torch.Tensor, embedding: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """transformers' head: product in the weights' dtype, then float32 soft-capping. [.., V] float32."""
    logits = F.linear(hidden, embedding).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
