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
