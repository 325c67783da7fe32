"""Sampler settings: the DiffusionGemma knobs, their defaults and their validation.

Values come, in order of precedence, from the user, from the model's `generation_config.json` (both
formats seen in the wild: flat keys with a `sampler_config` object, and the nested
`linear_temperature_schedule_config` / `diffusion_stopping_config` objects), and from the reference
defaults of transformers' `DiffusionGemmaGenerationConfig`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

# transformers' DiffusionGemmaGenerationConfig._get_default_generation_params
REFERENCE_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "entropy_bound": 0.1,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}
KNOBS = tuple(REFERENCE_DEFAULTS)
# Everything a user may set for the sampler's behaviour (batching and backend are engine choices, not these).
USER_KNOBS = (*KNOBS, "canvas_length", "seed", "adaptive_stopping", "revise_accepted", "record_drafts")

MAX_SEED = 2**63 - 1  # the output's `seed` column is int64
MAX_COMPLETIONS = 10_000  # completions per prompt; each has its own row key (rng.row_key)
SEED_RANGE = f"must be an integer from 0 to {MAX_SEED} (2**63 - 1: it is stored as int64)"


class SettingsError(ValueError):
    """A sampler setting is invalid; the message names the key."""


@dataclass(frozen=True)
class SamplerSettings:
    """Everything the sampler needs to know, fully resolved. Picklable; no defaults left to guess."""

    max_new_tokens: int
    max_denoising_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    canvas_length: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    seed: int = 0
    adaptive_stopping: bool = True
    revise_accepted: bool = True
    record_drafts: bool = False

    def __post_init__(self) -> None:
        check_knobs({f.name: getattr(self, f.name) for f in fields(self)}, prefix="sampler.")
        if self.canvas_length <= 0:
            raise SettingsError(f"sampler.canvas_length={self.canvas_length} must be a positive integer")

    @property
    def max_canvases(self) -> int:
        return math.ceil(self.max_new_tokens / self.canvas_length)

    def temperature(self, step: int) -> float:
        """Temperature at 0-based step `step` (the reference counts remaining steps N..1)."""
        remaining = self.max_denoising_steps - step
        return self.t_min + (self.t_max - self.t_min) * (remaining / self.max_denoising_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_knobs(values: Mapping[str, Any], prefix: str = "sampler.") -> None:
    """Checks the knobs present (not None) in `values`; relations are checked when both sides are set."""

    def bad(key: str, why: str) -> SettingsError:
        return SettingsError(f"{prefix}{key}={values[key]!r} {why}")

    def given(key: str) -> bool:
        return values.get(key) is not None

    for key in ("max_new_tokens", "max_denoising_steps"):
        if given(key) and (not is_int(values[key]) or values[key] <= 0):
            raise bad(key, "must be a positive integer")
    if given("stability_threshold") and (
        not is_int(values["stability_threshold"]) or values["stability_threshold"] < 0
    ):
        raise bad("stability_threshold", "must be an integer >= 0")
    for key in ("t_min", "t_max"):
        if given(key) and (not is_number(values[key]) or values[key] < 0):
            raise bad(key, "must be a number >= 0")
    for key in ("entropy_bound", "confidence_threshold"):
        if given(key) and (not is_number(values[key]) or values[key] <= 0):
            raise bad(key, "must be a number > 0")
    if given("seed") and not is_seed(values["seed"]):
        raise bad("seed", SEED_RANGE)
    if given("t_min") and given("t_max") and values["t_max"] <= values["t_min"]:
        raise SettingsError(
            f"{prefix}t_max={values['t_max']} must be greater than {prefix}t_min={values['t_min']} "
            "(the temperature falls linearly from t_max to t_min)"
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_seed(value: Any) -> bool:
    """A valid `sampler.seed` of either sampler (message: SEED_RANGE): an integer, not a bool, that fits the
    output's int64 `seed` column and is not negative."""
    return is_int(value) and 0 <= value <= MAX_SEED


def check_completions(value: Any, name: str) -> int:
    """`value` as completions per prompt (an integer from 1 to MAX_COMPLETIONS), else SettingsError naming
    `name`."""
    if not is_int(value) or not 1 <= value <= MAX_COMPLETIONS:
        raise SettingsError(f"{name}={value!r} must be an integer from 1 to {MAX_COMPLETIONS}")
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_generation_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Extracts the sampler knobs and special tokens from a generation_config.json mapping.

    Accepts flat keys (`t_min`, `stability_threshold`, ...) with `sampler_config: {entropy_bound}`, and the
    nested form `linear_temperature_schedule_config: {t_min, t_max}`,
    `diffusion_stopping_config: {stability_threshold, confidence_threshold}`. Unset values are omitted.
    """
    out: dict[str, Any] = {}
    for key in KNOBS:
        if raw.get(key) is not None:
            out[key] = raw[key]
    nested = {
        "sampler_config": ("entropy_bound",),
        "linear_temperature_schedule_config": ("t_min", "t_max", "max_denoising_steps"),
        "diffusion_stopping_config": ("stability_threshold", "confidence_threshold"),
    }
    for section, keys in nested.items():
        block = raw.get(section)
        if isinstance(block, Mapping):
            for key in keys:
                if block.get(key) is not None and key not in out:
                    out[key] = block[key]
    out.update(special_token_ids(raw))
    if is_int(raw.get("max_length")):
        out["max_length"] = raw["max_length"]
    return out


def special_token_ids(raw: Mapping[str, Any]) -> dict[str, Any]:
    """eos_token_ids (a tuple, from an id or a list of ids) and pad_token_id of a generation_config.json
    mapping, those it sets; SettingsError naming a value that is not a token id (or list of them)."""
    out: dict[str, Any] = {}
    eos = raw.get("eos_token_id")
    if eos is not None:
        ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if not all(is_int(i) and i >= 0 for i in ids):
            raise SettingsError(f"eos_token_id={eos!r} must be a token id or a list of token ids")
        out["eos_token_ids"] = tuple(ids)
    pad = raw.get("pad_token_id")
    if pad is not None:
        if not (is_int(pad) and pad >= 0):
            raise SettingsError(f"pad_token_id={pad!r} must be a token id")
        out["pad_token_id"] = pad
    return out


def diffusion_gemma_user_values(sampler: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The set values of the job's sampler knobs for the DiffusionGemma sampler; a mask-sampler knob
    (`sampler.mask.*`) that is set is an error naming it, as a DiffusionGemma knob is for a mask model
    (pipeline/sampler/mask/settings.mask_user_values)."""
    mask = {k: v for k, v in (sampler.get("mask") or {}).items() if v is not None}
    if mask:
        name = next(iter(mask))
        raise SettingsError(
            f"sampler.mask.{name}={mask[name]!r} is a mask-diffusion (LLaDA, Dream) setting; a {family} model "
            "is sampled with sampler.* (max_denoising_steps, t_min, t_max, entropy_bound, ...): unset it"
        )
    return {k: v for k, v in sampler.items() if v is not None}


def max_length_note(user: Mapping[str, Any], generation_config: Mapping[str, Any]) -> str | None:
    """What to tell the user when the model's generation_config.json bounds prompt + completion with
    `max_length` and nothing sets max_new_tokens: transformers' generate then gives each row max_length minus
    its prompt's length, while canvasflow gives every row the same budget (the sampler sizes its KV cache and
    counts canvases from one max_new_tokens). None when there is nothing to say."""
    max_length = generation_config.get("max_length")
    if max_length is None or user.get("max_new_tokens") is not None:
        return None
    if generation_config.get("max_new_tokens") is not None:
        return None
    return (
        f"the model's generation_config.json sets max_length={max_length} (prompt plus new tokens, so a "
        "per-row budget in transformers' generate), which canvasflow does not apply: every row gets up to "
        f"sampler.max_new_tokens={REFERENCE_DEFAULTS['max_new_tokens']} new tokens (the reference default); "
        "set sampler.max_new_tokens to choose the budget"
    )


def read_generation_json(model_dir: str) -> dict[str, Any]:
    """The raw `<model_dir>/generation_config.json`, or {} when the file does not exist."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:  # a traceback at start-up, "unexpected error"
        raise SettingsError(f"{path} is not valid UTF-8 (byte {e.start}): fix or re-download it") from None
    except (ValueError, RecursionError) as e:
        raise SettingsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path} is not a JSON object (got a {type(raw).__name__})")
    return raw


def read_generation_config(model_dir: str) -> dict[str, Any]:
    """Parsed knobs of `<model_dir>/generation_config.json`, or {} when the file does not exist."""
    try:
        return parse_generation_config(read_generation_json(model_dir))
    except SettingsError as e:
        path = os.path.join(model_dir, "generation_config.json")
        raise SettingsError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None


def resolve_settings(
    user: Mapping[str, Any],
    generation_config: Mapping[str, Any],
    *,
    canvas_length: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
) -> SamplerSettings:
    """User values (None = unset) over the model's generation config over the reference defaults."""
    check_knobs(user)
    values: dict[str, Any] = {}
    configured: list[str] = []  # the knobs taken from the model's generation config
    for key in KNOBS:
        if user.get(key) is not None:
            values[key] = user[key]
        elif generation_config.get(key) is not None:
            values[key] = generation_config[key]
            configured.append(key)
        else:
            values[key] = REFERENCE_DEFAULTS[key]
    # The reference validates floats strictly; accept ints where a float is meant.
    for key in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
        if is_number(values[key]):
            values[key] = float(values[key])
    extras = {
        k: user[k]
        for k in ("seed", "adaptive_stopping", "revise_accepted", "record_drafts")
        if user.get(k) is not None
    }
    for k in ("adaptive_stopping", "revise_accepted", "record_drafts"):  # "no" would be truthy
        if k in extras and not isinstance(extras[k], bool):
            raise SettingsError(f"sampler.{k}={extras[k]!r} must be true or false")
    canvas = user.get("canvas_length")
    if canvas is not None and (not is_int(canvas) or canvas < 1):
        raise SettingsError(f"sampler.canvas_length={canvas!r} must be a positive integer")
    try:
        return SamplerSettings(
            **values,
            canvas_length=canvas_length if canvas is None else canvas,
            eos_token_ids=tuple(generation_config.get("eos_token_ids", eos_token_ids)),
            pad_token_id=int(generation_config.get("pad_token_id", pad_token_id)),
            **extras,
        )
    except SettingsError as e:  # a value the user did not set: say where it came from
        taken = [k for k in configured if re.search(rf"\b{k}=", str(e))]
        if not taken:
            raise
        named = ", ".join(f"{k}={values[k]!r}" for k in taken)
        keys = " / ".join(f"sampler.{k}" for k in taken)
        raise SettingsError(
            f"{e}; {named} {'comes' if len(taken) == 1 else 'come'} from the model's generation_config.json: "
            f"set {keys} to override"
        ) from None
