"""Typed schemas of `conf/train_tiny.yaml` and `conf/eval_quality.yaml`, registered in Hydra's ConfigStore.

A misspelt key or a wrong type fails while Hydra composes the config; `check_train` / `check_eval` check
what types cannot express. Library code receives these dataclasses, never a DictConfig.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.schema import ConfigError


@dataclass
class TaskMix:
    # Relative weights of the tasks in the training stream.
    addition: float = 0.8
    sort: float = 0.1
    reverse: float = 0.1
    # Fraction of additions with both operands exactly 3 digits (the acceptance target); the rest draw
    # 1-4 digits per operand.
    addition_3digit: float = 0.75


@dataclass
class GenerationKnobs:
    """Written to the checkpoint's generation_config.json: the sampler defaults the model ships with."""

    max_new_tokens: int = 32
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005


@dataclass
class TrainConfig:
    seed: int = 0
    # torch intra-op threads; results are bitwise reproducible for a fixed seed AND thread count.
    threads: int = 1
    steps: int = 8500
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    grad_clip: float = 1.0
    # Re-noising rate per example: r ~ U(noise_floor, 1).
    noise_floor: float = 0.05
    # Probability that an example gets self-conditioning logits from a first no-grad pass.
    self_conditioning_prob: float = 0.5
    # The first pass's logits are divided by a temperature ~ U(sc_t_min, sc_t_max) before they are fed as
    # self-conditioning, because the sampler feeds temperature-scaled logits (t_max -> t_min) at inference.
    sc_t_min: float = 0.4
    sc_t_max: float = 0.8
    canvas_length: int = 32
    # Initial scale of the attention logits. DiffusionGemma attends with scaling 1 after RMS-normed q and k,
    # so with the q_norm/k_norm weights at their default 1 the logits have a standard deviation of
    # sqrt(head_dim) at initialisation (saturated, near one-hot attention), which made the tiny model take
    # ~2x the steps to learn to read the prompt. "unit": the weights start at head_dim ** -0.25, giving
    # logits of unit variance (what 1/sqrt(d) scaling gives other transformers). "reference": ones.
    qk_norm_init: str = "unit"
    # Overrides of pipeline.models.tiny.tiny_text_config (sizes of the architecture).
    text_overrides: dict[str, Any] = field(default_factory=dict)
    mix: TaskMix = field(default_factory=TaskMix)
    generation: GenerationKnobs = field(default_factory=GenerationKnobs)
    log_every: int = 50
    # Held-out accuracy through the real sampler every `eval_every` steps (0: only at the end).
    eval_every: int = 1000
    eval_rows_per_task: int = 64
    eval_max_batch: int = 64
    # Where the checkpoint goes (HF layout). The shipped model lives in pipeline/assets/tiny-diffusiongemma.
    out_dir: str = "pipeline/assets/tiny-diffusiongemma"


@dataclass
class EvalConfig:
    # A DiffusionGemma model, any path the loader accepts (mask-diffusion models are refused: the grid sets
    # DiffusionGemma knobs); the default is the shipped trained tiny model.
    model: str = "builtin:tiny-diffusiongemma"
    threads: int = 1
    # Held-out rows per task: addition (3-digit operands), sort and reverse (random lengths).
    rows_per_task: int = 64
    data_seed: int = 7
    sampler_seed: int = 0
    max_batch: int = 64
    # Sampler settings to evaluate: each entry overrides the model's defaults ({} = defaults). An entry may
    # set name (a label) and revise_accepted=false (the no-revision ablation).
    grid: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "default"}])
    # Also run every grid point with revise_accepted=false.
    ablate_all: bool = False
    out_dir: str = "outputs/eval_quality"


@dataclass
class TrainJob:
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EvalJob:
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_tiny_schema", node=TrainJob)
    cs.store(name="eval_quality_schema", node=EvalJob)


def _to_object(cfg: Any, schema: type) -> Any:
    from omegaconf import OmegaConf

    if isinstance(cfg, schema):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def check_train(cfg: TrainConfig) -> TrainConfig:
    for key in ("steps", "batch_size", "threads", "canvas_length", "log_every", "eval_rows_per_task"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(cfg, key)!r} must be a positive integer")
    if cfg.eval_every < 0 or cfg.warmup_steps < 0:
        raise ConfigError("train.eval_every and train.warmup_steps must be >= 0")
    if not 0.0 <= cfg.noise_floor < 1.0:
        raise ConfigError(f"train.noise_floor={cfg.noise_floor!r} must lie in [0, 1)")
    if not 0.0 <= cfg.self_conditioning_prob <= 1.0:
        raise ConfigError(f"train.self_conditioning_prob={cfg.self_conditioning_prob!r} must lie in [0, 1]")
    if not 0.0 < cfg.sc_t_min <= cfg.sc_t_max:
        raise ConfigError(f"train.sc_t_min={cfg.sc_t_min!r}, sc_t_max={cfg.sc_t_max!r}: need 0 < min <= max")
    if cfg.qk_norm_init not in ("unit", "reference"):
        raise ConfigError(f"train.qk_norm_init={cfg.qk_norm_init!r} is not one of unit, reference")
    weights = (cfg.mix.addition, cfg.mix.sort, cfg.mix.reverse)
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"train.mix weights {weights} must be >= 0 with a positive sum")
    if cfg.lr <= 0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.lr={cfg.lr!r} must be > 0 and train.min_lr_ratio in [0, 1]")
    return cfg


def check_eval(cfg: EvalConfig) -> EvalConfig:
    from pipeline.sampler.settings import KNOBS

    for key in ("threads", "rows_per_task", "max_batch"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"eval.{key}={getattr(cfg, key)!r} must be a positive integer")
    allowed = set(KNOBS) | {"name", "revise_accepted", "adaptive_stopping"}
    for i, point in enumerate(cfg.grid):
        unknown = set(point) - allowed
        if unknown:
            raise ConfigError(
                f"eval.grid[{i}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
    return cfg


def to_train_config(cfg: Any) -> TrainConfig:
    job = _to_object(cfg, TrainJob)
    return check_train(job.train if isinstance(job, TrainJob) else job)


def to_eval_config(cfg: Any) -> EvalConfig:
    job = _to_object(cfg, EvalJob)
    return check_eval(job.eval if isinstance(job, EvalJob) else job)


@contextmanager
def exit_on_bad_value(script: str) -> Iterator[None]:
    """The jobs' guard: a bad value (config key, model path, sampler knob) is reported in one line naming it
    and exits 2, without a traceback; any other error keeps its traceback (a bug to report)."""
    from pipeline.models.loader import ModelError
    from pipeline.sampler.settings import SettingsError

    try:
        yield
    except (ConfigError, ModelError, SettingsError) as e:
        sys.stderr.write(f"{script}: invalid configuration (exit code 2): {e}\n")
        sys.exit(2)
