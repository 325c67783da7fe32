"""Sampler settings: both generation_config.json formats, precedence, validation naming the key."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.sampler.settings import (
    REFERENCE_DEFAULTS,
    SamplerSettings,
    SettingsError,
    max_length_note,
    parse_generation_config,
    read_generation_config,
    resolve_settings,
)

FLAT = {
    "max_new_tokens": 512,
    "max_denoising_steps": 32,
    "t_min": 0.3,
    "t_max": 0.9,
    "stability_threshold": 2,
    "confidence_threshold": 0.01,
    "sampler_config": {"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"},
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
}
NESTED = {
    "max_new_tokens": 512,
    "max_denoising_steps": 32,
    "linear_temperature_schedule_config": {"t_min": 0.3, "t_max": 0.9},
    "diffusion_stopping_config": {"stability_threshold": 2, "confidence_threshold": 0.01},
    "sampler_config": {"entropy_bound": 0.2},
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
}


@pytest.mark.parametrize("raw", [FLAT, NESTED], ids=["flat", "nested"])
def test_both_generation_config_formats(raw, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    parsed = read_generation_config(str(tmp_path))
    assert parsed == {
        "max_new_tokens": 512,
        "max_denoising_steps": 32,
        "t_min": 0.3,
        "t_max": 0.9,
        "entropy_bound": 0.2,
        "stability_threshold": 2,
        "confidence_threshold": 0.01,
        "eos_token_ids": (1, 106),
        "pad_token_id": 0,
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ({"pad_token_id": [0]}, "pad_token_id=[0] must be a token id"),
        (
            {"eos_token_id": [1, "<eos>"]},
            "eos_token_id=[1, '<eos>'] must be a token id or a list of token ids",
        ),
        ({"eos_token_id": -1}, "eos_token_id=-1 must be a token id"),
        ([1], "is not a JSON object (got a list)"),
        (b'{"steps": "\xff"}', "is not valid UTF-8 (byte 11): fix or re-download it"),
        (b'{"steps": 4', "is not valid JSON: Expecting ',' delimiter"),
    ],
    ids=["pad-list", "eos-string", "eos-negative", "not-an-object", "not-utf8", "not-json"],
)
def test_special_tokens_that_are_not_token_ids_are_named_with_the_file(content, message, tmp_path):
    """They ended in a TypeError or AttributeError traceback (int() of a list, .get of a list) at startup, and
    bytes that are not UTF-8 in a UnicodeDecodeError ('unexpected error while preparing the run')."""
    from pipeline.sampler.mask.settings import MaskSettingsError, read_mask_generation_config

    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (tmp_path / "generation_config.json").write_bytes(raw)
    path = str(tmp_path / "generation_config.json")
    with pytest.raises(SettingsError, match=re.escape(path) + ".*" + re.escape(message)):
        read_generation_config(str(tmp_path))
    with pytest.raises(MaskSettingsError, match=re.escape(message)):
        read_mask_generation_config(str(tmp_path))


def test_precedence_user_over_model_over_reference():
    model = parse_generation_config({"t_min": 0.3, "max_denoising_steps": 20})
    settings = resolve_settings(
        {"max_denoising_steps": 7}, model, canvas_length=32, eos_token_ids=(1,), pad_token_id=0
    )
    assert settings.max_denoising_steps == 7
    assert settings.t_min == 0.3
    assert settings.t_max == REFERENCE_DEFAULTS["t_max"]
    assert settings.max_canvases == 8  # 256 / 32
    # the model's special tokens over the ones passed in (the tokenizer's); flat keys over nested ones
    model = parse_generation_config({**NESTED, "t_min": 0.2, "eos_token_id": [2, 9], "pad_token_id": 3})
    settings = resolve_settings({}, model, canvas_length=32, eos_token_ids=(1,), pad_token_id=0)
    assert (settings.eos_token_ids, settings.pad_token_id, settings.t_min) == ((2, 9), 3, 0.2)
    settings = resolve_settings({}, {}, canvas_length=32, eos_token_ids=(1,), pad_token_id=0)
    assert (settings.eos_token_ids, settings.pad_token_id) == ((1,), 0)


def test_unset_engine_knobs_take_their_defaults():
    """None means unset for every user value: a None adaptive_stopping must not turn adaptive stopping off."""
    unset = dict.fromkeys(("seed", "adaptive_stopping", "revise_accepted", "record_drafts"))
    settings = resolve_settings(unset, {}, canvas_length=32, eos_token_ids=(1,), pad_token_id=0)
    assert (settings.seed, settings.adaptive_stopping, settings.revise_accepted, settings.record_drafts) == (
        0,
        True,
        True,
        False,
    )


def test_temperature_schedule_counts_remaining_steps():
    s = resolve_settings(
        {"max_denoising_steps": 4, "t_min": 0.4, "t_max": 0.8},
        {},
        canvas_length=8,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    assert [round(s.temperature(i), 6) for i in range(4)] == [0.8, 0.7, 0.6, 0.5]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"t_min": 0.5, "t_max": 0.4}, "sampler.t_max=0.4 must be greater than sampler.t_min=0.5"),
        ({"t_min": 0.5, "t_max": 0.5}, "sampler.t_max=0.5 must be greater than sampler.t_min=0.5"),
        ({"max_denoising_steps": 0}, "sampler.max_denoising_steps=0 must be a positive integer"),
        ({"entropy_bound": -1.0}, "sampler.entropy_bound=-1.0 must be a number > 0"),
        ({"stability_threshold": -2}, "sampler.stability_threshold=-2 must be an integer >= 0"),
        ({"confidence_threshold": 0}, "sampler.confidence_threshold=0 must be a number > 0"),
        ({"max_new_tokens": 1.5}, "sampler.max_new_tokens=1.5 must be a positive integer"),
    ],
)
def test_invalid_values_name_the_key(values, message):
    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("+", r"\+")):
        resolve_settings(values, {}, canvas_length=8, eos_token_ids=(1,), pad_token_id=0)


def test_settings_validate_themselves():
    with pytest.raises(SettingsError, match="canvas_length"):
        SamplerSettings(
            max_new_tokens=8,
            max_denoising_steps=4,
            t_min=0.4,
            t_max=0.8,
            entropy_bound=0.1,
            stability_threshold=1,
            confidence_threshold=0.1,
            canvas_length=0,
            eos_token_ids=(1,),
            pad_token_id=0,
        )


def test_a_max_length_budget_the_sampler_does_not_apply_is_reported_unless_max_new_tokens_is_set(tmp_path):
    """transformers' generate turns generation_config.json's max_length into max_length - prompt tokens per
    row when max_new_tokens is left at its default; canvasflow's budget is one max_new_tokens for every row."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 300, "t_min": 0.3}))
    model = read_generation_config(str(tmp_path))
    assert model["max_length"] == 300
    settings = resolve_settings({}, model, canvas_length=8, eos_token_ids=(1,), pad_token_id=0)
    assert settings.max_new_tokens == REFERENCE_DEFAULTS["max_new_tokens"]
    note = max_length_note({}, model)
    assert note is not None and "max_length=300" in note and "sampler.max_new_tokens=256" in note
    assert max_length_note({"max_new_tokens": 64}, model) is None
    assert max_length_note({}, {**model, "max_new_tokens": 64}) is None
    assert max_length_note({}, parse_generation_config(FLAT)) is None


@pytest.mark.parametrize(
    ("user", "config", "message"),
    [
        ({}, {"max_new_tokens": 0}, "max_new_tokens=0 comes from the model's generation_config.json: set "
         "sampler.max_new_tokens to override"),
        ({"t_min": 0.9}, {"t_max": 0.8}, "t_max=0.8 comes from the model's generation_config.json: set "
         "sampler.t_max to override"),
        ({}, {"t_min": 0.9, "t_max": 0.8}, "t_min=0.9, t_max=0.8 come from the model's generation_config.json: "
         "set sampler.t_min / sampler.t_max to override"),
    ],
)  # fmt: skip
def test_an_invalid_value_from_the_generation_config_says_where_it_came_from(user, config, message, tmp_path):
    """LLM(model) on a model whose generation_config.json holds max_new_tokens 0 failed with "max_new_tokens=0
    must be a positive integer", a setting its user never gave, as the mask sampler's settings say."""
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError) as info:
        resolve_settings(
            user, read_generation_config(str(tmp_path)), canvas_length=8, eos_token_ids=(1,), pad_token_id=0
        )
    assert str(info.value).endswith(f"; {message}")
    with pytest.raises(SettingsError) as info:  # the user's own value is named as it is
        resolve_settings(
            {"t_min": 0.9, "t_max": 0.8}, {}, canvas_length=8, eos_token_ids=(1,), pad_token_id=0
        )
    assert "generation_config" not in str(info.value)
