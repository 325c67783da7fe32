"""The training loop of the tiny DiffusionGemma model: seeded, CPU-sized, checkpointed in the HF layout.

Reproducibility: the weights are initialised after torch.manual_seed(seed); the data order comes from
random.Random(seed) (pipeline.training.data); every noise/self-conditioning draw from a torch.Generator
seeded with `seed`; torch uses `threads` intra-op threads. The same seed, thread count and torch build give
bitwise the same weights (tests/training/test_loop.py checks a few steps).

The checkpoint is written by transformers' own save_pretrained (config.json, model.safetensors) plus the
character tokenizer and generation_config.json, into `<out_dir>.partial`, which replaces `out_dir` only
when complete; training_log.json records the config, the loss curve and the held-out accuracy curve.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.models.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TINY_VISION_CONFIG,
    build_tokenizer,
    tiny_text_config,
    write_generation_config,
)
from pipeline.training.config import GenerationKnobs, TrainConfig
from pipeline.training.data import train_batches
from pipeline.training.evaluate import evaluate, format_scores, heldout_instances
from pipeline.training.objective import ObjectiveSettings, diffusion_loss
from pipeline.training.staging import TRAINING_LOG, publish_checkpoint, stage_checkpoint

logger = logging.getLogger(__name__)

EVAL_SEED = 1  # held-out rows for the in-training accuracy (the quality test and eval job use others)
FROZEN_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # unused by text tasks


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    wall_s: float  # whole run, evaluations and saving included
    train_s: float  # optimisation steps only
    final_loss: float
    curve: list[dict[str, Any]] = field(default_factory=list)  # evaluations: step, accuracy per task
    losses: list[dict[str, float]] = field(default_factory=list)  # logged windows: step, loss

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.train_s if self.train_s > 0 else 0.0


def generation_config_dict(knobs: GenerationKnobs) -> dict[str, Any]:
    """generation_config.json in the format of pipeline.models.tiny.TINY_GENERATION_CONFIG."""
    return {
        "max_new_tokens": knobs.max_new_tokens,
        "max_denoising_steps": knobs.max_denoising_steps,
        "t_min": knobs.t_min,
        "t_max": knobs.t_max,
        "sampler_config": {"entropy_bound": knobs.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
        "stability_threshold": knobs.stability_threshold,
        "confidence_threshold": knobs.confidence_threshold,
        "eos_token_id": [EOS_ID],
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
    }


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """A freshly initialised DiffusionGemmaForBlockDiffusion with the tiny config (seeded by the caller)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(
        text_config=tiny_text_config(**cfg.text_overrides),
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=cfg.canvas_length,
    )
    model = DiffusionGemmaForBlockDiffusion(config)
    if cfg.qk_norm_init == "unit":
        init_qk_norms(model)
    return model


@torch.no_grad()
def init_qk_norms(model: torch.nn.Module) -> None:
    """Sets every q_norm/k_norm scale to head_dim ** -0.25: unit-variance attention logits at init (the
    attention has scaling 1, see TrainConfig.qk_norm_init). Encoder and decoder share these weights."""
    for name, module in model.named_modules():
        if name.endswith(("self_attn.q_norm", "self_attn.k_norm")) and "vision" not in name:
            module.weight.fill_(module.weight.shape[0] ** -0.25)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # tied weights appear once
        if name.startswith(FROZEN_PREFIXES):
            param.requires_grad_(False)
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def objective_settings(cfg: TrainConfig, vocab_size: int) -> ObjectiveSettings:
    return ObjectiveSettings(
        vocab_size=vocab_size,
        noise_floor=cfg.noise_floor,
        self_conditioning_prob=cfg.self_conditioning_prob,
        sc_t_min=cfg.sc_t_min,
        sc_t_max=cfg.sc_t_max,
    )


def sampler_settings(cfg: TrainConfig, **overrides: Any):
    """The sampler settings the shipped generation_config.json resolves to (plus `overrides`)."""
    from pipeline.sampler.settings import parse_generation_config, resolve_settings

    return resolve_settings(
        overrides,
        parse_generation_config(generation_config_dict(cfg.generation)),
        canvas_length=cfg.canvas_length,
        eos_token_ids=(EOS_ID,),
        pad_token_id=PAD_ID,
    )


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    start: int,
    stop: int,
) -> list[tuple[float, int]]:
    """Runs optimisation steps start..stop-1; returns (loss, prompt + canvas tokens) per step."""
    settings = objective_settings(cfg, model.config.text_config.vocab_size)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    model.train()
    for step in range(start, stop):
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = diffusion_loss(model, batch.prompt_ids, batch.target, settings, generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append((out.loss.detach().item(), batch.prompt_ids.numel() + batch.target.numel()))
    return losses


def train(cfg: TrainConfig) -> TrainResult:
    """Trains the tiny model and writes the checkpoint to cfg.out_dir (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel

    hf_logging.disable_progress_bar()
    run_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out_dir, staging = stage_checkpoint(cfg.out_dir)
    tokenizer = build_tokenizer(staging)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = train_batches(
        tokenizer, seed=cfg.seed, mix=cfg.mix, batch_size=cfg.batch_size, canvas_length=cfg.canvas_length
    )
    native = DiffusionGemmaTextModel(model)  # shares the modules: the sampler sees the current weights
    eval_set = heldout_instances(cfg.eval_rows_per_task, seed=EVAL_SEED)
    settings = sampler_settings(cfg)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    logger.info(
        "training %.2fM parameters for %d steps of %d examples on %d threads (seed %d)",
        trainable / 1e6,
        cfg.steps,
        cfg.batch_size,
        cfg.threads,
        cfg.seed,
    )

    result = TrainResult(
        out_dir=str(out_dir), steps=cfg.steps, wall_s=0.0, train_s=0.0, final_loss=float("nan")
    )
    window: list[float] = []
    tokens = 0
    step = 0
    # chunks end at every multiple of log_every and of eval_every
    chunk = math.gcd(cfg.log_every, cfg.eval_every) if cfg.eval_every else cfg.log_every
    while step < cfg.steps:
        stop = min(cfg.steps, step + chunk)
        t0 = time.perf_counter()
        done = train_steps(model, optimizer, batches, cfg, generator, start=step, stop=stop)
        result.train_s += time.perf_counter() - t0
        window.extend(loss for loss, _ in done)
        tokens += sum(n for _, n in done)
        step = stop
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss = sum(window) / len(window)
            result.losses.append({"step": step, "loss": loss})
            result.final_loss = loss
            window = []
            rate = step / result.train_s
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  %.0f tokens/s  elapsed %.0fs  ETA %.0fs",
                step,
                cfg.steps,
                loss,
                lr_at(step - 1, cfg),
                rate,
                tokens / result.train_s,
                time.perf_counter() - run_start,
                (cfg.steps - step) / rate,
            )
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            scores, outcomes, seconds = evaluate(
                native, tokenizer, settings, eval_set, max_batch=cfg.eval_max_batch
            )
            result.curve.append({"step": step, **{t: s.accuracy for t, s in scores.items()}})
            logger.info("held-out at step %d (%.0fs): %s", step, seconds, format_scores(scores))
            for o in outcomes[:: max(1, len(outcomes) // 6)][:6]:
                logger.info("  %-22r -> %-18r expected %r", o.prompt, o.completion, o.expected)

    model.eval()
    model.save_pretrained(str(staging))
    write_generation_config(staging, generation_config_dict(cfg.generation))  # replaces HF's default one
    result.wall_s = time.perf_counter() - run_start
    log = {
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "steps_per_s": result.steps_per_s,
        "train_s": result.train_s,
        "wall_s": result.wall_s,
        "losses": result.losses,
        "heldout_accuracy": result.curve,
    }
    (staging / TRAINING_LOG).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    publish_checkpoint(staging, out_dir)
    logger.info(
        "saved %s: %d steps, %.0fs training (%.2f steps/s), %.0fs wall",
        out_dir,
        cfg.steps,
        result.train_s,
        result.steps_per_s,
        result.wall_s,
    )
    return result
