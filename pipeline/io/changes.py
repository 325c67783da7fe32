"""What differs between a run's recorded identity (_run.json) and a new start's, in the words of the config:
"sampler.seed 0 -> 7", "the input's content (data.path a -> b)", not two digests. RunStore.open refuses such a
start with it (pipeline/io/commit.py)."""

from __future__ import annotations

import json
from typing import Any

SHOWN_CHANGES = 6  # settings named in a refusal; the others are counted
SETTING_NAMES = {"completions_per_prompt": "sampler.completions_per_prompt"}
_UNSET = object()


def _setting_name(key: str, mask: bool) -> str:
    """The config key of a recorded setting. A mask-diffusion run records its resolved sampler settings flat
    (`sampler.cache`), where the config sets them under sampler.mask (`sampler.mask.cache`), bar
    max_new_tokens, seed and record_drafts."""
    if mask and key.startswith("sampler."):
        from pipeline.sampler.mask.settings import KNOBS

        knob = key[len("sampler.") :]
        if knob in KNOBS and knob != "max_new_tokens":
            return f"sampler.mask.{knob}"
    return SETTING_NAMES.get(key, key)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _short(value: Any, width: int = 40) -> str:
    if value is _UNSET:
        return "(unset)"
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def identity_changes(existing: dict[str, Any], identity: dict[str, Any], different: list[str]) -> list[str]:
    """What differs between a run's recorded identity and this start's (`different`: the compared keys that
    do), by setting where _run.json records the settings (`config`): "sampler.seed 0 -> 7", not two digests."""
    changes = []
    for key in different:
        old, new = existing.get(key), identity.get(key)
        if key == "config_fingerprint" and isinstance(existing.get("config"), dict):
            before, after = _flat(existing["config"]), _flat(identity.get("config") or {})
            # null and absent alike: `postprocess: null`, then `postprocess._target_: f` is one change, not two
            names = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            model = (
                f"; model {existing.get('model')} -> {identity.get('model')}"
                if existing.get("model") != identity.get("model")
                else ""
            )
            mask = "sampler.mask_token_id" in before.keys() | after.keys()  # a LLaDA / Dream run's settings
            named = [
                f"the model's content (its weights, config or tokenizer files{model})"
                if k == "model.identity"
                else f"{_setting_name(k, mask)} {_short(before.get(k, _UNSET))} -> {_short(after.get(k, _UNSET))}"
                for k in names
            ]
            if named:
                more = len(named) - SHOWN_CHANGES
                changes += named[:SHOWN_CHANGES] + ([f"{more} more setting(s)"] if more > 0 else [])
                continue
        if key == "input_fingerprint":
            before, after = existing.get("input_path"), identity.get("input_path")
            path = f" (data.path {before} -> {after})" if before != after else f" (data.path {after})"
            changes.append("the input's content" + (path if after else ""))
        elif key == "num_rows":
            changes.append(f"input rows {old} -> {new}")
        elif key == "shard_size":
            changes.append(f"run.shard_size {old} -> {new}")
        else:
            changes.append(f"{key} {str(old)[:12]} -> {str(new)[:12]}")
    return changes
