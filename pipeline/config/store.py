"""Registers the schemas in Hydra's ConfigStore and turns a composed DictConfig into a JobConfig."""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.config.validate import validate_job

_GROUP_SCHEMAS = {
    "model": ModelConfig,
    "sampler": SamplerConfig,
    "data": DataConfig,
    "output": OutputConfig,
    "cluster": ClusterConfig,
}


def register_configs() -> None:
    """Stores the job schema (`canvasflow_schema`) and one schema per group (`<group>/schema`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="canvasflow_schema", node=JobConfig)
    for group, node in _GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=node)
    cs.store(group="run", name="schema", node=RunConfig)


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
