"""Values that used to pass validation and fail later: sampler.seed out of int64 range (every shard failed with
OverflowError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, JobConfig, register_configs, to_job_config
from pipeline.config.schema import (
    DataConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.runner.job import run

ROOT = Path(__file__).resolve().parents[2]
register_configs()


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("seed", ["18446744073709551616", "9223372036854775808", "-1"])
def test_seed_outside_int64_fails_at_startup_naming_the_key(seed):
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", f"sampler.seed={seed}"))
    assert f"sampler.seed={seed} must be an integer from 0 to 9223372036854775807" in str(info.value)


def test_largest_seed_is_accepted():
    assert to_job_config(_compose("config", "sampler.seed=9223372036854775807")).sampler.seed == 2**63 - 1


def test_a_job_with_a_too_large_seed_exits_2_before_any_work(tmp_path, caplog):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    job = JobConfig(
        model=ModelConfig(path="builtin:tiny-diffusiongemma"),
        sampler=SamplerConfig(seed=2**64),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        run=RunConfig(id="r1"),
    )
    assert run(job) == 2
    assert "sampler.seed=18446744073709551616 must be an integer from 0 to" in caplog.text
    assert not (tmp_path / "out" / "r1").exists()
