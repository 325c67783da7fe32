"""Answer quality against decoder forward passes over a grid of sampler settings (jobs/eval_quality.py).

Each grid point overrides some sampler knobs of the model's defaults; every point runs the same held-out
rows through DiffusionSampler (keyed, continuous batching) and reports, per task, exact-match accuracy
and the mean decoder forward passes per row. `revise_accepted=false` points are the no-revision ablation.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.schema import ConfigError
from pipeline.training.evaluate import RowOutcome, evaluate

logger = logging.getLogger(__name__)

TASK_ORDER = ("addition", "sort", "reverse", "all")
KNOB_COLUMNS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "confidence_threshold",
    "revise_accepted",
)


@dataclass
class GridPoint:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PointResult:
    point: GridPoint
    settings: dict[str, Any]  # the resolved knobs
    scores: dict[str, Any]  # task -> TaskScore
    outcomes: list[RowOutcome]
    wall_s: float


def point_name(overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return "default"
    short = {"max_denoising_steps": "steps", "entropy_bound": "eb", "confidence_threshold": "conf"}
    parts = []
    for key, value in overrides.items():
        if key == "revise_accepted":
            parts.append("no-revision" if not value else "revision")
        else:
            parts.append(f"{short.get(key, key)}={value}")
    return " ".join(parts)


def expand_grid(grid: Sequence[Mapping[str, Any]], *, ablate_all: bool = False) -> list[GridPoint]:
    """Grid entries -> named points; with ablate_all, each point also runs with revise_accepted=false."""
    points = []
    for entry in grid:
        overrides = {k: v for k, v in entry.items() if k != "name"}
        points.append(GridPoint(str(entry.get("name") or point_name(overrides)), overrides))
    if ablate_all:
        for p in list(points):
            twin = {**p.overrides, "revise_accepted": False}
            # a no-revision point the grid already lists (conf/eval_quality.yaml has two) is not run twice
            if p.overrides.get("revise_accepted", True) and all(q.overrides != twin for q in points):
                points.append(GridPoint(p.name + " no-revision", twin))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.grid point names must be unique; got {names}")
    return points


def run_grid(
    loaded: Any,
    instances: Sequence[Any],
    points: Sequence[GridPoint],
    *,
    seed: int = 0,
    max_batch: int = 64,
    progress: Callable[[int, int, PointResult], None] | None = None,
) -> list[PointResult]:
    """Runs every point on `instances` with the model of `loaded` (a pipeline.models.loader.LoadedModel)."""
    from pipeline.sampler.settings import resolve_settings

    info = loaded.info
    results = []
    for i, point in enumerate(points):
        settings = resolve_settings(
            {**point.overrides, "seed": seed},
            info.generation_config,
            canvas_length=info.canvas_length,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
        )
        start = time.perf_counter()
        scores, outcomes, _ = evaluate(
            loaded.model, loaded.tokenizer, settings, instances, max_batch=max_batch
        )
        result = PointResult(point, settings.to_dict(), scores, outcomes, time.perf_counter() - start)
        results.append(result)
        if progress is not None:
            progress(i, len(points), result)
    return results


def table_rows(results: Sequence[PointResult]) -> list[dict[str, Any]]:
    """One row per (point, task): the knobs, accuracy and mean decoder passes per row."""
    rows = []
    for r in results:
        for task in TASK_ORDER:
            s = r.scores.get(task)
            if s is None:
                continue
            row = {"point": r.point.name, "task": task}
            row.update({k: r.settings[k] for k in KNOB_COLUMNS})
            row.update(
                {"rows": s.rows, "accuracy": round(s.accuracy, 4), "mean_passes": round(s.mean_steps, 2)}
            )
            rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(results: Sequence[PointResult]) -> str:
    """Points as rows; per task `accuracy / mean passes`."""
    tasks = [t for t in TASK_ORDER if any(t in r.scores for r in results)]
    head = "| point | steps | eb | t_min-t_max | conf | revise | " + " | ".join(
        f"{t} acc / passes" for t in tasks
    )
    lines = [head + " |", "|" + "---|" * (6 + len(tasks))]
    for r in results:
        s = r.settings
        cells = [
            r.point.name,
            str(s["max_denoising_steps"]),
            f"{s['entropy_bound']:g}",
            f"{s['t_min']:g}-{s['t_max']:g}",
            f"{s['confidence_threshold']:g}",
            "yes" if s["revise_accepted"] else "no",
        ]
        cells += [f"{r.scores[t].accuracy:.1%} / {r.scores[t].mean_steps:.1f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[PointResult], path: Path) -> None:
    """Accuracy against mean decoder passes per row, one panel per task; no-revision points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if any(t in r.scores for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]  # distinct colours for up to 20 points
    for ax, task in zip(axes[0], tasks, strict=True):
        for j, r in enumerate(results):
            s = r.scores[task]
            revise = r.settings["revise_accepted"]
            color = colors[j % len(colors)]
            ax.scatter(
                s.mean_steps,
                100 * s.accuracy,
                s=46,
                marker="o" if revise else "s",
                facecolors=color if revise else "none",
                edgecolors=color,
                label=r.point.name,
            )
        ax.set_title(task)
        ax.set_xlabel("mean decoder forward passes per row")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(cfg: Any) -> str:
    """jobs/eval_quality.py: loads the model, runs the grid, writes the table, plot and samples to
    cfg.out_dir (an EvalConfig); returns the Markdown table."""
    import json

    import torch

    from pipeline.models.loader import MASK_FAMILIES, inspect_model, load_model, resolve_model_dir
    from pipeline.training.evaluate import format_scores, heldout_instances

    points = expand_grid(cfg.grid, ablate_all=cfg.ablate_all)  # a bad grid fails before anything is loaded
    model_dir = resolve_model_dir(cfg.model)
    family = inspect_model(model_dir, name=cfg.model if cfg.model.startswith("builtin:") else None).family
    # Its grid is of DiffusionGemma knobs: resolving them failed on canvas_length=0.
    if family in MASK_FAMILIES:
        raise ConfigError(
            f"eval.model={cfg.model!r} is a {family} model (mask diffusion): jobs/eval_quality.py evaluates "
            "DiffusionGemma models only (its grid sets the DiffusionGemma sampler's knobs). Give a DiffusionGemma "
            "checkpoint, e.g. eval.model=builtin:tiny-diffusiongemma; the tiny LLaDA model is measured by "
            "benchmarks/bench_mask_cache.py (docs/quality.md)"
        )
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(cfg.model, dtype="float32", device="cpu")
    instances = heldout_instances(cfg.rows_per_task, seed=cfg.data_seed)
    logger.info(
        "%s: %d grid points x %d held-out rows (%s)",
        loaded.info.model_dir,
        len(points),
        len(instances),
        ", ".join(f"{t} {cfg.rows_per_task}" for t in ("addition 3-digit", "sort", "reverse")),
    )

    def progress(i: int, total: int, r: PointResult) -> None:
        logger.info("[%d/%d] %s (%.1fs): %s", i + 1, total, r.point.name, r.wall_s, format_scores(r.scores))

    results = run_grid(
        loaded, instances, points, seed=cfg.sampler_seed, max_batch=cfg.max_batch, progress=progress
    )
    write_csv(table_rows(results), out / "quality.csv")
    table = markdown_table(results)
    (out / "quality.md").write_text(table, encoding="utf-8")
    plot(results, out / "quality.png")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for o in results[0].outcomes:
            f.write(json.dumps(vars(o)) + "\n")
    logger.info("wrote %s/{quality.csv,quality.md,quality.png,samples.jsonl}", out)
    return table
