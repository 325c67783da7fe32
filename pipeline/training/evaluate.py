"""Held-out exact-match accuracy through canvasflow's own DiffusionSampler (keyed mode, continuous batching).

Prompts are encoded as the pipeline does (pipeline.training.data.encode_prompt), completions decoded as the
pipeline does (skip_special_tokens=True) and judged by the project's checker (`check_row`). The decoder
forward passes a row costs are the sampler's own `Result.denoising_steps`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.tasks.checker import check_row
from pipeline.tasks.generators import Instance, sample_instances
from pipeline.training.data import encode_prompt

logger = logging.getLogger(__name__)

# Sizes of the held-out sets: addition with two 3-digit operands (the acceptance target), sort and
# reverse at their generators' random lengths.
HELDOUT_SIZES: dict[str, int | None] = {"addition": 3, "sort": None, "reverse": None}


@dataclass
class RowOutcome:
    row_id: str
    task: str
    prompt: str
    expected: str
    completion: str
    correct: bool
    denoising_steps: int
    canvases: int


@dataclass
class TaskScore:
    task: str
    rows: int
    accuracy: float
    mean_steps: float  # decoder forward passes per row


def heldout_instances(
    rows_per_task: int, seed: int, sizes: Mapping[str, int | None] = HELDOUT_SIZES
) -> list[Instance]:
    """A fixed held-out set: `rows_per_task` distinct held-out instances per task, deterministic for `seed`."""
    out: list[Instance] = []
    for task, size in sizes.items():
        out.extend(sample_instances(task, rows_per_task, seed=seed, split="heldout", size=size))
    return out


def run_heldout(
    model: Any,
    tokenizer: Any,
    settings: Any,
    instances: Sequence[Instance],
    *,
    max_batch: int = 64,
) -> list[RowOutcome]:
    """Generates every instance with `settings` (a SamplerSettings) and judges it. `model` is the native
    DiffusionGemmaTextModel (its modules may be shared with a model being trained; it is put in eval mode)."""
    import torch

    from pipeline.sampler.engine import DiffusionSampler, Request

    was_training = model.training
    model.eval()
    try:
        prompts = [encode_prompt(tokenizer, inst.prompt) for inst in instances]
        sampler = DiffusionSampler(
            model, settings, max_batch=max_batch, max_prompt_tokens=max(len(p) for p in prompts)
        )
        requests = [
            Request(f"{inst.task}-{i:04d}", ids)
            for i, (inst, ids) in enumerate(zip(instances, prompts, strict=True))
        ]
        with torch.no_grad():
            results = sampler.generate(requests, batching="continuous")
    finally:
        model.train(was_training)
    outcomes = []
    for inst, req, res in zip(instances, requests, results, strict=True):
        completion = tokenizer.decode(res.token_ids, skip_special_tokens=True)
        verdict = check_row({"prompt": inst.prompt, "completion": completion})
        outcomes.append(
            RowOutcome(
                row_id=req.row_id,
                task=inst.task,
                prompt=inst.prompt,
                expected=inst.answer,
                completion=completion,
                correct=bool(verdict["is_correct"]),
                denoising_steps=res.denoising_steps,
                canvases=res.canvases,
            )
        )
    return outcomes


def score(outcomes: Sequence[RowOutcome]) -> dict[str, TaskScore]:
    """Per-task accuracy and mean decoder passes per row, plus "all"."""
    groups: dict[str, list[RowOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.task, []).append(o)
    groups["all"] = list(outcomes)
    return {
        task: TaskScore(
            task=task,
            rows=len(rows),
            accuracy=sum(o.correct for o in rows) / max(len(rows), 1),
            mean_steps=sum(o.denoising_steps for o in rows) / max(len(rows), 1),
        )
        for task, rows in groups.items()
    }


def evaluate(
    model: Any, tokenizer: Any, settings: Any, instances: Sequence[Instance], *, max_batch: int = 64
) -> tuple[dict[str, TaskScore], list[RowOutcome], float]:
    """(scores, outcomes, wall seconds)."""
    start = time.perf_counter()
    outcomes = run_heldout(model, tokenizer, settings, instances, max_batch=max_batch)
    return score(outcomes), outcomes, time.perf_counter() - start


def format_scores(scores: Mapping[str, TaskScore]) -> str:
    return "  ".join(f"{t}={s.accuracy:.1%} ({s.mean_steps:.1f} passes)" for t, s in scores.items())
