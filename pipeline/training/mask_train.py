"""Training of the tiny LLaDA-architecture model (jobs/train_tiny_llada.py) on the verifiable tasks, with
LLaDA's masked-diffusion objective (mask_objective.py), and its held-out evaluation through canvasflow's own
mask sampler (exact path and block caches).

The data stream is the DiffusionGemma tiny model's (pipeline.training.data: chat-templated prompts, answer +
EOS + EOS padding as target, batches of one prompt length); the checkpoint is written in LLaDA's published
layout (pipeline.models.tiny_mask), so `builtin:tiny-llada` loads it through the normal path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config.schema import ConfigError
from pipeline.training.config import TaskMix
from pipeline.training.staging import TRAINING_LOG, publish_checkpoint, stage_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class MaskModelShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2


@dataclass
class MaskTrainConfig:
    seed: int = 0
    threads: int = 1  # torch intra-op threads (bitwise reproducible for a fixed seed and thread count)
    steps: int = 14000
    batch_size: int = 16
    lr: float = 5e-4  # without QK-norm, 2e-3 left the digits at chance (docs/quality.md)
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eps: float = 1e-3  # mask ratio p = (1 - eps) t + eps, t ~ U(0, 1)
    stratified_t: bool = True  # the batch's t spread evenly over (0, 1) (see mask_objective.py)
    # q/k projections drawn with std 1/sqrt(hidden) (unit-variance attention logits at init) instead of 0.02:
    # with near-uniform attention at init the copy-like tasks are learnt much later.
    qk_unit_init: bool = True
    answer_length: int = 16  # generated tokens (answer + EOS padding); the sampler's max_new_tokens
    block_length: int = 8
    shape: MaskModelShape = field(default_factory=MaskModelShape)
    mix: TaskMix = field(default_factory=lambda: TaskMix(addition=0.8, sort=0.2, reverse=0.0))
    time_budget_s: float | None = None  # stop early (and still save) after this much wall time
    log_every: int = 100
    eval_rows_per_task: int = 64
    eval_seed: int = 7
    out_dir: str = "pipeline/assets/tiny-llada"


def check_mask_train(cfg: MaskTrainConfig) -> MaskTrainConfig:
    for key in ("steps", "batch_size", "threads", "answer_length", "block_length"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(cfg, key)!r} must be a positive integer")
    if cfg.answer_length % cfg.block_length:
        raise ConfigError(
            f"train.answer_length={cfg.answer_length} must be a multiple of train.block_length={cfg.block_length}"
        )
    if not 0 < cfg.eps < 1:
        raise ConfigError(f"train.eps={cfg.eps!r} must be in (0, 1)")
    return cfg


def lr_at(step: int, cfg: MaskTrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def generation_config(cfg: MaskTrainConfig) -> dict[str, Any]:
    from pipeline.models.tiny_mask import default_generation_config

    values = default_generation_config("llada")
    values.update(max_new_tokens=cfg.answer_length, steps=cfg.answer_length, block_length=cfg.block_length)
    return values


def evaluate(
    model: Any, tokenizer: Any, settings: Any, instances: Sequence[Any], *, max_batch: int = 64
) -> tuple[dict[str, Any], float]:
    """(per-task scores as pipeline.training.evaluate.score, forward FLOPs) of `settings` (MaskSettings)."""
    from pipeline.sampler.engine import Request
    from pipeline.sampler.mask.engine import MaskDiffusionSampler
    from pipeline.tasks.checker import check_row
    from pipeline.training.data import encode_prompt
    from pipeline.training.evaluate import RowOutcome, score

    prompts = [encode_prompt(tokenizer, inst.prompt) for inst in instances]
    sampler = MaskDiffusionSampler(
        model, settings, max_batch=max_batch, max_prompt_tokens=max(map(len, prompts))
    )
    requests = [
        Request(f"{inst.task}-{i:04d}", ids)
        for i, (inst, ids) in enumerate(zip(instances, prompts, strict=True))
    ]
    results = sampler.generate(requests)
    outcomes = []
    for inst, req, res in zip(instances, requests, results, strict=True):
        completion = tokenizer.decode(res.token_ids, skip_special_tokens=True)
        verdict = check_row({"prompt": inst.prompt, "completion": completion})
        outcomes.append(
            RowOutcome(req.row_id, inst.task, inst.prompt, inst.answer, completion, bool(verdict["is_correct"]),
                       res.denoising_steps, res.canvases)
        )  # fmt: skip
    return score(outcomes), sampler.stats.flops(model)


def train(cfg: MaskTrainConfig) -> Path:
    """Trains, evaluates the exact path once, writes the checkpoint to cfg.out_dir and returns it."""
    from pipeline.models.bidirectional import BidirectionalLM
    from pipeline.models.tiny_mask import build_mask_tokenizer, init_weights, tiny_spec, write_tiny_checkpoint
    from pipeline.sampler.mask.settings import MaskSettings
    from pipeline.training.data import train_batches
    from pipeline.training.evaluate import format_scores, heldout_instances
    from pipeline.training.mask_objective import masked_diffusion_loss

    check_mask_train(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out, staging = stage_checkpoint(cfg.out_dir)  # the checkpoint replaces out only once it is whole
    tokenizer = build_mask_tokenizer(staging, "llada")
    spec = tiny_spec("llada", **vars(cfg.shape), context_window=256)
    model = BidirectionalLM(spec)
    init_weights(model, torch.Generator().manual_seed(cfg.seed))
    if cfg.qk_unit_init:
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        with torch.no_grad():
            for layer in model.layers:
                for proj in (layer.q_proj, layer.k_proj):
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) / spec.hidden_size**0.5)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    batches = train_batches(
        tokenizer, seed=cfg.seed, mix=cfg.mix, batch_size=cfg.batch_size, canvas_length=cfg.answer_length
    )
    started = time.perf_counter()
    losses: list[dict[str, float]] = []
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = next(batches)
        result = masked_diffusion_loss(
            model, batch.prompt_ids, batch.target, generator, eps=cfg.eps, stratified=cfg.stratified_t
        )
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        elapsed = time.perf_counter() - started
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append({"step": step, "loss": result.loss.item(), "masked_accuracy": result.accuracy})
            logger.info(
                "step %d/%d loss %.4f masked-acc %.3f lr %.2e %.1fs",
                step, cfg.steps, result.loss.item(), result.accuracy, lr_at(step, cfg), elapsed,
            )  # fmt: skip
        if cfg.time_budget_s is not None and elapsed > cfg.time_budget_s:
            logger.info("time budget of %.0fs reached at step %d; stopping", cfg.time_budget_s, step + 1)
            break
    steps_done, train_s = step + 1, time.perf_counter() - started
    model.eval().requires_grad_(False)
    write_tiny_checkpoint(model, staging, generation_config=generation_config(cfg))
    settings = MaskSettings(
        max_new_tokens=cfg.answer_length,
        steps=cfg.answer_length,
        block_length=cfg.block_length,
        mask_token_id=spec.mask_token_id,
        eos_token_ids=tuple(generation_config(cfg)["eos_token_id"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    scores, _ = evaluate(model, tokenizer, settings, heldout_instances(cfg.eval_rows_per_task, cfg.eval_seed))
    logger.info("held-out (exact path): %s; checkpoint in %s", format_scores(scores), out)
    log = {
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "steps_done": steps_done,
        "train_s": train_s,
        "steps_per_s": steps_done / train_s,
        "losses": losses,
        "heldout_exact_path": {task: dataclasses.asdict(score) for task, score in scores.items()},
    }
    (staging / TRAINING_LOG).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    publish_checkpoint(staging, out)
    return out
