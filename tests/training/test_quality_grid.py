"""The grid of jobs/eval_quality.py: the shipped config's points, with and without eval.ablate_all."""

from pathlib import Path

from omegaconf import OmegaConf

from pipeline.training.config import to_eval_config
from pipeline.training.quality import expand_grid

CONF = Path(__file__).resolve().parents[2] / "conf" / "eval_quality.yaml"


def _shipped_grid() -> list[dict]:
    return to_eval_config({"eval": OmegaConf.load(CONF).eval}).grid


def test_ablate_all_expands_the_shipped_grid():
    # docs/quality.md: python jobs/eval_quality.py eval.rows_per_task=200 eval.ablate_all=true
    plain = expand_grid(_shipped_grid())
    points = expand_grid(_shipped_grid(), ablate_all=True)
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert names[: len(plain)] == [p.name for p in plain]
    # every revising point has its no-revision twin, and no two points run the same settings
    settings = [tuple(sorted(p.overrides.items())) for p in points]
    assert len(set(settings)) == len(settings)
    for p in plain:
        twin = tuple(sorted({**p.overrides, "revise_accepted": False}.items()))
        assert twin in settings


def test_ablate_all_adds_a_no_revision_twin_per_point():
    points = expand_grid([{}, {"max_denoising_steps": 8}], ablate_all=True)
    assert [p.name for p in points] == ["default", "steps=8", "default no-revision", "steps=8 no-revision"]
    assert points[3].overrides == {"max_denoising_steps": 8, "revise_accepted": False}


DOCS = Path(__file__).resolve().parents[2] / "docs" / "quality.md"


def test_the_docs_table_is_what_the_tool_prints_for_the_shipped_grid():
    """docs/quality.md labelled points and columns otherwise than jobs/eval_quality.py prints them ("t 0.1-0.2"
    for "t_min=0.1 t_max=0.2", "addition" for "addition acc / passes"). The docs' figures, put back through the
    tool's own table, must give the docs' table."""
    from pipeline.models.loader import inspect_model, resolve_model_dir
    from pipeline.sampler.settings import resolve_settings
    from pipeline.training.evaluate import TaskScore
    from pipeline.training.quality import PointResult, markdown_table

    lines = DOCS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| point | steps |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    documented = lines[start:end]
    tasks = ["addition", "sort", "reverse", "all"]
    info = inspect_model(resolve_model_dir("builtin:tiny-diffusiongemma"), name="builtin:tiny-diffusiongemma")
    results = []
    for point, row in zip(expand_grid(_shipped_grid()), documented[2:], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")][-len(tasks) :]
        scores = {}
        for task, cell in zip(tasks, cells, strict=True):
            accuracy, passes = cell.split(" / ")
            scores[task] = TaskScore(task, 64, float(accuracy.rstrip("%")) / 100, float(passes))
        settings = resolve_settings(
            {**point.overrides, "seed": 0},
            info.generation_config,
            canvas_length=info.canvas_length,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
        )
        results.append(PointResult(point, settings.to_dict(), scores, [], 0.0))
    assert markdown_table(results).splitlines() == documented
