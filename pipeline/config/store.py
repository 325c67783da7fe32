"""Registers the schemas in Hydra's ConfigStore and turns a composed DictConfig into a JobConfig."""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import ConfigError, JobConfig, NightlyJobConfig
from pipeline.config.validate import validate_job


def register_configs() -> None:
    """Stores the job schema as `canvasflow_schema`: the first entry of conf/config.yaml's defaults, it types
    every group, so a misspelt key or a wrong type fails while Hydra composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="canvasflow_schema", node=JobConfig)
    ConfigStore.instance().store(name="canvasflow_nightly_schema", node=NightlyJobConfig)


def to_job_config(cfg: Any, schema: type[JobConfig] = JobConfig) -> JobConfig:
    """Converts a composed Hydra config to a validated `schema` instance (raises ConfigError naming the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, JobConfig):
        return validate_job(cfg)
    try:
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).replace("\n", " ")) from None
    assert isinstance(job, schema)
    return validate_job(job)
