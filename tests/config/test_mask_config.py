"""Configuration of mask-diffusion models: the model/sampler options compose, sampler.mask.* is typed and
validated naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, register_configs, to_job_config

CONF = Path(__file__).resolve().parents[2] / "conf"
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_llada_options_compose():
    job = to_job_config(_compose("model=tiny_llada", "sampler=llada", "sampler.mask.cache=dual"))
    assert (job.model.path, job.model.family) == ("builtin:tiny-llada", "llada")
    assert job.sampler.mask.cache == "dual" and job.sampler.mask.steps is None
    job = to_job_config(_compose("model=llada", "model.path=/models/LLaDA-8B-Instruct", "sampler=llada"))
    assert job.model.dtype == "bfloat16"
    assert to_job_config(_compose()).sampler.mask.cache is None, "the default job leaves the mask knobs unset"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.mask.cache=full", "sampler.mask.cache='full' is not one of none, prefix, dual"),
        ("sampler.mask.remasking=lowest", "sampler.mask.remasking='lowest' is not one of"),
        ("sampler.mask.threshold=0", "sampler.mask.threshold=0.0 must be a number in (0, 1]"),
        ("sampler.mask.steps=-4", "sampler.mask.steps=-4 must be a positive integer"),
        ("model.family=gpt", "model.family='gpt' is not one of auto, diffusion_gemma, llada, dream"),
    ],
)
def test_bad_mask_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        to_job_config(_compose("model=tiny_llada", "sampler=llada", override))
    assert message in str(err.value)


def test_misspelt_mask_key_fails_at_composition():
    with pytest.raises(Exception, match="blok_length"):
        to_job_config(_compose("sampler=llada", "sampler.mask.blok_length=8"))
