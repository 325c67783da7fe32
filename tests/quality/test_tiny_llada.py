"""The shipped tiny LLaDA-architecture model (jobs/train_tiny_llada.py), loaded through the normal loader and
run by canvasflow's mask sampler with the model's default settings (LLaDA's low-confidence schedule, blocks of
8): the exact path must keep solving held-out additions, and the block caches must stay within a stated
accuracy of it.

Floors = accuracy measured on this fixed set minus a margin of about three binomial standard errors. The
cache tolerance is the stated accuracy of the block caches: on each task, prefix and dual may lose at most
CACHE_TOLERANCE of the exact path's accuracy on this set.
"""

import pytest

from pipeline.models.loader import BUILTIN_TINY_LLADA
from pipeline.sampler.mask.settings import resolve_mask_settings
from pipeline.tasks.generators import sample_instances
from pipeline.training.evaluate import HELDOUT_SIZES
from pipeline.training.mask_train import evaluate
from tests.support.models import load_shipped

SEED = 2027  # the same fixed held-out set as the DiffusionGemma tiny model's quality test
ROWS = {"addition": 256, "sort": 128}
# Measured 2026-11-27 with the shipped checkpoint (training_log.json: seed 0, 14,000 steps, lr 5e-4), temperature
# 0 (deterministic): exact path addition 88.3% (226/256), sort 28.9% (37/128); prefix cache 83.2% / 31.2%;
# dual cache 83.6% / 30.5%. Margins: 6 points for addition (3 SE = 6.0), 12 for sort (3 SE = 12.0).
FLOORS = {"addition": 0.82, "sort": 0.17}
CACHE_TOLERANCE = 0.08  # worst measured loss: 5.1 points (prefix, addition)
# Forward FLOPs saved against the exact path, measured 64.8% (prefix) and 75.7% (dual): the prefix cache skips
# the prompt and finished blocks after a block's first step, the dual cache everything but the block.
MIN_FLOPS_SAVED = {"prefix": 0.60, "dual": 0.70}


@pytest.fixture(scope="module")
def loaded():
    yield from load_shipped(BUILTIN_TINY_LLADA, "tiny-llada")


@pytest.fixture(scope="module")
def runs(loaded):
    info = loaded.info
    instances = [
        inst
        for task, rows in ROWS.items()
        for inst in sample_instances(task, rows, seed=SEED, split="heldout", size=HELDOUT_SIZES[task])
    ]
    out = {}
    for cache in ("none", "prefix", "dual"):
        settings = resolve_mask_settings(
            {"cache": cache},
            info.generation_config,
            family=info.family,
            mask_token_id=info.mask_token_id,
            eos_token_ids=info.eos_token_ids,
            pad_token_id=info.pad_token_id,
        )
        out[cache] = (settings, *evaluate(loaded.model, loaded.tokenizer, settings, instances))
    return out


@pytest.mark.parametrize("task", list(FLOORS))
def test_exact_path_accuracy_floor(runs, task):
    settings, scores, _ = runs["none"]
    assert (settings.steps, settings.block_length, settings.remasking) == (16, 8, "low_confidence")
    assert scores[task].accuracy >= FLOORS[task], f"{task}: {scores[task].accuracy:.1%}"


@pytest.mark.parametrize("cache", list(MIN_FLOPS_SAVED))
@pytest.mark.parametrize("task", list(FLOORS))
def test_block_caches_stay_within_the_stated_accuracy(runs, cache, task):
    exact = runs["none"][1][task].accuracy
    cached = runs[cache][1][task].accuracy
    assert cached >= exact - CACHE_TOLERANCE, f"{task}, cache={cache}: {cached:.1%} vs exact {exact:.1%}"


@pytest.mark.parametrize("cache", list(MIN_FLOPS_SAVED))
def test_block_caches_save_forward_flops(runs, cache):
    saved = 1 - runs[cache][2] / runs["none"][2]
    assert saved >= MIN_FLOPS_SAVED[cache], f"cache={cache} saved {saved:.1%} of the exact path's FLOPs"
