"""Configuration: dataclass schemas, Hydra registration and validation (no heavy imports here)."""

from pipeline.config.schema import (
    ClusterConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.config.store import register_configs, to_job_config
from pipeline.config.validate import validate_job

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "SamplerConfig",
    "register_configs",
    "to_job_config",
    "validate_job",
]
