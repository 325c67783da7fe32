"""Dream (Dream-org/Dream-v0-Instruct-7B, a Qwen2.5 initialisation): config.json keys and parameter names.

Dream's checkpoints ship their own modeling code (`modeling_dream.py`, Qwen2 layers run without a causal
mask); canvasflow never runs it. It reads config.json (model_type "Dream") and the safetensors under their
published names:

  model.embed_tokens.weight
  model.layers.N.input_layernorm.weight / post_attention_layernorm.weight
  model.layers.N.self_attn.{q_proj,k_proj,v_proj}.{weight,bias}    (q/k/v always carry biases)
  model.layers.N.self_attn.o_proj.weight
  model.layers.N.mlp.{gate_proj,up_proj,down_proj}.weight
  model.norm.weight
  lm_head.weight                                                     (absent or ignored with tie_word_embeddings)

Dream predicts token p from the hidden state of position p - 1 (`generation_utils.py` shifts its logits
right by one), so its spec has shift_logits=True.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.bidirectional import MaskLMSpec

MODEL_TYPE = "Dream"
MASK_TOKEN_ID = 151666  # <|mask|>
EOS_TOKEN_ID = 151643  # <|endoftext|>


def spec_from_config(config: dict[str, Any], where: str) -> MaskLMSpec:
    """The native spec of a Dream config.json; raises ValueError naming an unsupported key."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: Dream config.json needs an integer {key!r}; got {config.get(key)!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: Dream config hidden_act={config['hidden_act']!r} is not supported (silu)")
    if config.get("rope_scaling") is not None:
        raise ValueError(
            f"{where}: Dream config rope_scaling={config['rope_scaling']!r} is not supported (null)"
        )
    if config.get("use_sliding_window"):
        raise ValueError(f"{where}: Dream config use_sliding_window=true is not supported (false)")
    heads = config["num_attention_heads"]
    return MaskLMSpec(
        family="dream",
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        mask_token_id=int(config.get("mask_token_id", MASK_TOKEN_ID)),
        shift_logits=True,
        context_window=int(config.get("max_position_embeddings", 32768)),
    )


def published_name(native: str) -> str:
    """The checkpoint name of a native parameter name (BidirectionalLM.state_dict keys)."""
    parts = native.split(".")
    if parts[0] == "embed":
        return "model.embed_tokens.weight"
    if parts[0] == "norm":
        return "model.norm.weight"
    if parts[0] == "lm_head":
        return "lm_head.weight"
    index, module, leaf = parts[1], parts[2], parts[3]
    renamed = {
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }[module]
    return f"model.layers.{index}.{renamed}.{leaf}"


def config_for(spec: MaskLMSpec, **extra: Any) -> dict[str, Any]:
    """A config.json in Dream's layout for `spec` (used to write tiny checkpoints)."""
    config: dict[str, Any] = {
        "architectures": ["DreamModel"],
        "model_type": MODEL_TYPE,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "mask_token_id": spec.mask_token_id,
        "max_position_embeddings": spec.context_window,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_embeddings,
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": spec.vocab_size,
    }
    config.update(extra)
    return config
