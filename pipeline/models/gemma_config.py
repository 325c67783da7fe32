"""A DiffusionGemma config.json read as transformers reads it, without importing transformers.

Reading it through transformers' `DiffusionGemmaConfig` costs a process 1.5-3 s (its field validation imports
transformers' activations and hub-kernel integrations), paid by every worker before its first token and by the
driver's startup checks. This reads the fields the sampler's text model needs, with transformers' defaults
for those a config leaves out (DiffusionGemmaTextConfig's, as of transformers 5.24; the tests compare every
field with transformers' own reading, so a change of default there fails CI rather than a job). A value the
forward does not run, or that does not fit the architecture, is a ValueError naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "use_bidirectional_attention": None,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}
SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "num_experts",
    "top_k_experts", "moe_intermediate_size",
)  # fmt: skip
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu", "swish", "relu")  # gemma_layers runs these
ROPE_TYPES = ("default", "proportional")
SLIDING_WINDOW_PATTERN = 6  # transformers' default layer_types: five sliding layers, then a full one


@dataclass(frozen=True)
class TextConfig:
    """The text model's settings under transformers' attribute names; per layer: head_dims, kv_heads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_activation: str
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    sliding_window: int
    final_logit_softcapping: float | None
    use_bidirectional_attention: str | None
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    layer_types: tuple[str, ...]
    rope_parameters: dict[str, dict[str, Any]]
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]


@dataclass(frozen=True)
class GemmaConfig:
    text_config: TextConfig
    canvas_length: int
    tie_word_embeddings: bool


def parse_config(config: dict[str, Any]) -> GemmaConfig:
    """The DiffusionGemma settings of a config.json object (model_type "diffusion_gemma")."""
    raw = config.get("text_config")
    raw = {} if raw is None else raw  # transformers' default text config
    if not isinstance(raw, dict):
        raise ValueError(f"text_config must be an object, got {type(raw).__name__}")
    values = {key: raw.get(key, default) for key, default in TEXT_DEFAULTS.items()}
    for key in SIZES:
        value = values[key]
        if value is None and key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            raise ValueError(
                f"text_config.{key} is not set: canvasflow runs DiffusionGemma's mixture of experts"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"text_config.{key}={value!r} must be a positive integer")
    eps = values["rms_norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ValueError(f"text_config.rms_norm_eps={eps!r} must be a number in (0, 1)")
    if values["hidden_activation"] not in ACTIVATIONS:
        raise ValueError(
            f"text_config.hidden_activation={values['hidden_activation']!r} is not supported; canvasflow runs "
            f"{', '.join(ACTIVATIONS)}"
        )
    bidirectional = values["use_bidirectional_attention"]
    if bidirectional not in (None, "vision", "all"):
        raise ValueError(
            f"text_config.use_bidirectional_attention={bidirectional!r} is not one of null, 'vision', 'all'"
        )
    # "all": transformers' encoder is then non-causal; ours is causal (diffusion_gemma.py)
    if bidirectional == "all":
        raise ValueError(
            "text_config.use_bidirectional_attention='all' (a bidirectional encoder) is not supported: "
            "canvasflow's encoder is causal"
        )
    if values["top_k_experts"] > values["num_experts"]:
        raise ValueError(
            f"text_config.top_k_experts={values['top_k_experts']} exceeds num_experts={values['num_experts']}"
        )
    layers = values["num_hidden_layers"]
    layer_types = _layer_types(raw.get("layer_types"), layers)
    head_dims, kv_heads = _per_layer(raw, values, layer_types)
    text = TextConfig(
        **values,
        layer_types=layer_types,
        rope_parameters=_rope(raw, layer_types, head_dims),
        head_dims=head_dims,
        kv_heads=kv_heads,
    )
    canvas = config.get("canvas_length", 256)
    if not isinstance(canvas, int) or isinstance(canvas, bool) or canvas <= 0:
        raise ValueError(f"canvas_length={canvas!r} must be a positive integer")
    return GemmaConfig(
        text_config=text,
        canvas_length=canvas,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def _layer_types(layer_types: Any, layers: int) -> tuple[str, ...]:
    if layer_types is None:
        layer_types = [FULL if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else SLIDING for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        raise ValueError(
            f"text_config.layer_types must list one type per layer ({layers}), got {layer_types!r}"
        )
    odd = sorted({t for t in layer_types if t not in (SLIDING, FULL)})
    if odd:
        raise ValueError(f"text_config.layer_types has {odd}; DiffusionGemma's are {SLIDING} and {FULL}")
    if layer_types[-1] != FULL:
        logger.warning(
            "the last layer must use full_attention, as transformers forces it; got %s", layer_types[-1]
        )
        layer_types = [*layer_types[:-1], FULL]
    return tuple(layer_types)


def _per_layer(
    raw: dict[str, Any], values: dict[str, Any], layer_types: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Head dim and key/value heads of each layer: the globals, with `per_layer_config`'s overrides (null: none),
    or, without the key, transformers' rule: full layers get global_head_dim (default 512) and
    num_global_key_value_heads. Overrides that change nothing (the global value, an empty `skip`) are dropped,
    as transformers drops them; any other key is refused."""
    if "per_layer_config" in raw:
        overrides = {} if raw["per_layer_config"] is None else raw["per_layer_config"]
    else:
        full = {"head_dim": raw.get("global_head_dim", 512)}
        if raw.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = raw["num_global_key_value_heads"]
        overrides = {i: full for i, t in enumerate(layer_types) if t == FULL}
    if not isinstance(overrides, dict):
        raise ValueError(f"text_config.per_layer_config must be an object, got {overrides!r}")
    by_layer: dict[int, dict[str, Any]] = {}
    for key, override in overrides.items():
        index = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else -1
        if not 0 <= index < len(layer_types) or not isinstance(override, dict):
            raise ValueError(f"text_config.per_layer_config[{key!r}]: keys are layer indices, values objects")
        unknown = sorted(
            k
            for k, v in override.items()
            if k not in PER_LAYER_KEYS and not (k == "skip" and v == []) and v != values.get(k, raw.get(k))
        )
        if unknown:
            raise ValueError(
                f"text_config.per_layer_config[{key!r}] sets {unknown}; canvasflow runs per-layer "
                f"{' and '.join(PER_LAYER_KEYS)} only"
            )
        by_layer[index] = {k: v for k, v in override.items() if k in PER_LAYER_KEYS}
    head_dims, kv_heads = [], []
    for i in range(len(layer_types)):
        layer = {**{k: values[k] for k in PER_LAYER_KEYS}, **by_layer.get(i, {})}
        for key in PER_LAYER_KEYS:
            if not isinstance(layer[key], int) or isinstance(layer[key], bool) or layer[key] <= 0:
                raise ValueError(f"layer {i}: {key}={layer[key]!r} must be a positive integer")
        if values["num_attention_heads"] % layer["num_key_value_heads"]:
            raise ValueError(
                f"layer {i}: num_attention_heads={values['num_attention_heads']} is not a multiple of "
                f"num_key_value_heads={layer['num_key_value_heads']}"
            )
        head_dims.append(layer["head_dim"])
        kv_heads.append(layer["num_key_value_heads"])
    return tuple(head_dims), tuple(kv_heads)


def _rope(
    raw: dict[str, Any], layer_types: tuple[str, ...], head_dims: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    """Each layer type's RoPE parameters (transformers' defaults without any), standardised as transformers
    does (a legacy `type` names the rope_type; rope_theta and partial_rotary_factor set at the top of
    text_config fill in), of a type gemma_layers runs, for one head dim per layer type (the cos/sin of a type
    are shared by its layers)."""
    rope = raw.get("rope_parameters")
    rope = DEFAULT_ROPE if rope is None else rope
    if not isinstance(rope, dict):
        raise ValueError(f"text_config.rope_parameters must be an object per layer type, got {rope!r}")
    out = {}
    for layer_type in sorted(set(layer_types)):
        where = f"text_config.rope_parameters[{layer_type!r}]"
        params = rope.get(layer_type)
        if isinstance(params, dict):
            params = dict(params)
            params.setdefault("rope_type", params.get("type", "default"))
            for key in ("rope_theta", "partial_rotary_factor"):
                if raw.get(key) is not None:
                    params.setdefault(key, raw[key])
        if not isinstance(params, dict) or not isinstance(params.get("rope_theta"), (int, float)):
            raise ValueError(f"{where} must be an object with a rope_theta, got {params!r}")
        kind = params["rope_type"]
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"{where}.rope_type={kind!r} is not supported; canvasflow runs {', '.join(ROPE_TYPES)}"
            )
        if kind == "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: a partial_rotary_factor with rope_type 'default' is not supported")
        dims = sorted({head_dims[i] for i, t in enumerate(layer_types) if t == layer_type})
        if len(dims) != 1:
            raise ValueError(
                f"the {layer_type} layers have head dims {dims}; canvasflow needs one per layer type"
            )
        out[layer_type] = params
    return out
