"""Registers the schemas in Hydra's ConfigStore and turns a composed DictConfig into a JobConfig."""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import JobConfig
from pipeline.config.validate import validate_job


def register_configs() -> None:
    """Stores the job schema as `canvasflow_schema`: the first entry of conf/config.yaml's defaults, it types
    every group, so a misspelt key or a wrong type fails while Hydra composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="canvasflow_schema", node=JobConfig)


def to_job_config(cfg: Any) -> JobConfig:
    """Converts a composed Hydra config to a validated JobConfig (raises ConfigError naming the key)."""
    from omegaconf import OmegaConf

    if isinstance(cfg, JobConfig):
        return validate_job(cfg)
    base = OmegaConf.structured(JobConfig)
    merged = OmegaConf.merge(base, cfg)
    job = OmegaConf.to_object(merged)
    assert isinstance(job, JobConfig)
    return validate_job(job)
