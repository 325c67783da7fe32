"""LLaDA (GSAI-ML/LLaDA-8B-Instruct, LLaDA 1.5): config.json keys and published parameter names.

LLaDA's checkpoints ship their own modeling code (`modeling_llada.py`, an OLMo derivative, "llama" blocks);
canvasflow never runs it. It reads config.json and the safetensors under their published names:

  model.transformer.wte.weight                               embedding [embedding_size, d_model]
  model.transformer.blocks.N.attn_norm.weight / ff_norm.weight   RMS norms
  model.transformer.blocks.N.{q_proj,k_proj,v_proj}.weight   (+ .bias with include_qkv_bias)
  model.transformer.blocks.N.attn_out.weight                 attention output
  model.transformer.blocks.N.{ff_proj,up_proj,ff_out}.weight gate, up, down of act(ff_proj(x)) * up_proj(x)
  model.transformer.ln_f.weight                              final norm
  model.transformer.ff_out.weight                            vocabulary head (absent with weight_tying)

Only the configuration LLaDA publishes is supported (llama blocks, RMS norms, SiLU, RoPE, no biases besides
q/k/v, no q/k norms, no logit or embedding scaling); anything else is refused with the key named.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.bidirectional import MaskLMSpec

MODEL_TYPE = "llada"
MASK_TOKEN_ID = 126336  # <|mdm_mask|>
EOS_TOKEN_ID = 126081  # <|endoftext|>
PREFIX = "model.transformer."

# Keys whose value must be the published one: (key, required value, default when the key is absent).
_REQUIRED: tuple[tuple[str, Any, Any], ...] = (
    ("block_type", "llama", "sequential"),
    ("layer_norm_type", "rms", "default"),
    ("activation_type", "silu", "swiglu"),
    ("rope", True, False),
    ("alibi", False, False),
    ("attention_layer_norm", False, False),
    ("include_bias", False, True),
    ("input_emb_norm", False, False),
    ("scale_logits", False, False),
    ("block_group_size", 1, 1),
)


def spec_from_config(config: dict[str, Any], where: str) -> MaskLMSpec:
    """The native spec of a LLaDA config.json; raises ValueError naming an unsupported key."""
    for key, required, default in _REQUIRED:
        value = config.get(key, default)
        if value != required:
            raise ValueError(
                f"{where}: LLaDA config {key}={value!r} is not supported (canvasflow runs {required!r})"
            )
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: LLaDA config.json needs an integer {key!r}; got {config.get(key)!r}")
    d_model, n_heads = config["d_model"], config["n_heads"]
    if config.get("multi_query_attention"):
        kv_heads = 1
    else:
        kv_heads = config.get("n_kv_heads") or n_heads
    hidden = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d_model
    return MaskLMSpec(
        family="llada",
        vocab_size=int(config.get("embedding_size") or config["vocab_size"]),
        hidden_size=d_model,
        intermediate_size=int(hidden),
        num_layers=config["n_layers"],
        num_heads=n_heads,
        num_kv_heads=int(kv_heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        mask_token_id=int(config.get("mask_token_id", MASK_TOKEN_ID)),
        shift_logits=False,
        context_window=int(config.get("max_sequence_length", 4096)),
    )


def published_name(native: str) -> str:
    """The checkpoint name of a native parameter name (BidirectionalLM.state_dict keys)."""
    parts = native.split(".")
    if parts[0] == "embed":
        return PREFIX + "wte.weight"
    if parts[0] == "norm":
        return PREFIX + "ln_f.weight"
    if parts[0] == "lm_head":
        return PREFIX + "ff_out.weight"
    index, module, leaf = parts[1], parts[2], parts[3]
    renamed = {
        "attn_norm": "attn_norm",
        "mlp_norm": "ff_norm",
        "q_proj": "q_proj",
        "k_proj": "k_proj",
        "v_proj": "v_proj",
        "o_proj": "attn_out",
        "gate_proj": "ff_proj",
        "up_proj": "up_proj",
        "down_proj": "ff_out",
    }[module]
    return f"{PREFIX}blocks.{index}.{renamed}.{leaf}"


def config_for(spec: MaskLMSpec, **extra: Any) -> dict[str, Any]:
    """A config.json in LLaDA's layout for `spec` (used to write tiny checkpoints)."""
    config: dict[str, Any] = {
        "architectures": ["LLaDAModelLM"],
        "model_type": MODEL_TYPE,
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": spec.hidden_size,
        "embedding_size": spec.vocab_size,
        "include_bias": False,
        "include_qkv_bias": spec.qkv_bias,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "mask_token_id": spec.mask_token_id,
        "max_sequence_length": spec.context_window,
        "mlp_hidden_size": spec.intermediate_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "n_layers": spec.num_layers,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope": True,
        "rope_theta": spec.rope_theta,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": spec.vocab_size,
        "weight_tying": spec.tie_embeddings,
    }
    config.update(extra)
    return config
