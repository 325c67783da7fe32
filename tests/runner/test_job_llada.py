"""The real job with a LLaDA-family model (local Ray workers): the same output schema as DiffusionGemma's,
the same rows as the one-process API, and start-up errors that name the key."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import MaskSamplerConfig
from pipeline.io.parts import OUTPUT_SCHEMA
from pipeline.runner.job import run
from tests.runner.test_job import make_job, read_parts, write_prompts
from tests.support.mask_models import build_mask_checkpoint

pytestmark = pytest.mark.ray

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    return build_mask_checkpoint(tmp_path_factory.mktemp("llada") / "tiny-llada", std=0.1, eos_like=28)


def _llada_job(tmp_path, data, model_path, **overrides):
    job = make_job(tmp_path, data, model__path=str(model_path), **overrides)
    job.sampler.max_denoising_steps = None
    job.sampler.max_new_tokens = NEW_TOKENS
    job.sampler.mask = MaskSamplerConfig(steps=8, block_length=8, cache="dual", threshold=0.5)
    return job


def test_llada_job_writes_the_same_schema(tmp_path, ray_local, llada_dir):
    data = write_prompts(tmp_path / "prompts.jsonl", 10)
    job = _llada_job(tmp_path, data, llada_dir)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    table = read_parts(run_dir)
    rows = table.to_pylist()
    assert len(rows) == 10

    # the schema every DiffusionGemma run writes (tests/runner/test_job.py reads it back from parts)
    assert table.schema.remove_metadata().equals(OUTPUT_SCHEMA), "one output schema for every model family"
    for r in rows:
        assert r["finish_reason"] in ("eos", "length") and r["model"] == "tiny-llada"
        assert r["completion_tokens"] <= NEW_TOKENS and 1 <= r["denoising_steps"] <= NEW_TOKENS
        assert 1 <= r["canvases"] <= 2
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_out"] == 10 and stats["denoising_steps"] == sum(r["denoising_steps"] for r in rows)
    sampler = stats["this_invocation"]["sampler"]  # the mask sampler's counters, summed over the workers
    counters = sampler["counters"]
    assert counters["workers"] == 2 and counters["row_forwards"] >= stats["denoising_steps"]
    assert 0 < counters["valid_query_tokens"] <= counters["query_tokens"]
    assert sampler["valid_token_share"] == round(counters["valid_query_tokens"] / counters["query_tokens"], 4)
    assert 0 < sampler["live_rows_per_pass"] <= sampler["computed_rows_per_pass"] <= 4
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["sampler"]["cache"] == "dual" and manifest["sampler"]["block_length"] == 8
    assert manifest["model_family"] == "llada", "what the sampler settings are of"
    assert "Mask diffusion with LLaDA's `generate`" in (run_dir / "README.md").read_text()

    from pipeline import LLM
    from pipeline.data.readers import read_input

    llm = LLM(
        str(llada_dir),
        max_new_tokens=NEW_TOKENS,
        mask={"steps": 8, "block_length": 8, "cache": "dual", "threshold": 0.5},
    )
    inputs = read_input(job.data).table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    for out in llm.generate([r["prompt"] for r in inputs], ids=[r["id"] for r in inputs]):
        assert (out.completion, out.denoising_steps) == (
            by_id[out.id]["completion"],
            by_id[out.id]["denoising_steps"],
        )


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return build_mask_checkpoint(
        tmp_path_factory.mktemp("dream") / "tiny-dream", family="dream", std=0.1, eos_like=7
    )


def test_a_dream_job_samples_with_dreams_algorithm_and_its_generation_config(tmp_path, ray_local, dream_dir):
    """A Dream checkpoint runs Dream's diffusion_generate by default, with the knobs of its
    generation_config.json in Dream's names (`alg: entropy`): one block, Dream's schedule; the one-process
    API gives the same rows."""
    data = write_prompts(tmp_path / "prompts.jsonl", 6)
    job = make_job(tmp_path, data, model__path=str(dream_dir))
    job.sampler.max_denoising_steps = None
    job.sampler.max_new_tokens = NEW_TOKENS
    job.sampler.mask = MaskSamplerConfig(steps=8, top_k=4)
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    rows = read_parts(run_dir).to_pylist()
    assert len(rows) == 6
    for r in rows:
        assert r["model"] == "tiny-dream" and r["canvases"] == 1 and 1 <= r["denoising_steps"] <= 8
    sampler = json.loads((run_dir / "_manifest.json").read_text())["sampler"]
    assert (sampler["algorithm"], sampler["remasking"], sampler["block_length"], sampler["top_k"]) == (
        "dream",
        "entropy",
        NEW_TOKENS,
        4,
    )

    from pipeline import LLM
    from pipeline.data.readers import read_input

    llm = LLM(str(dream_dir), max_new_tokens=NEW_TOKENS, mask={"steps": 8, "top_k": 4})
    inputs = read_input(job.data).table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    for out in llm.generate([r["prompt"] for r in inputs], ids=[r["id"] for r in inputs]):
        assert out.completion == by_id[out.id]["completion"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampler__t_min": 0.1}, "sampler.t_min=0.1 is a DiffusionGemma setting"),
        # switches that default to true were silently ignored when turned off
        ({"sampler__revise_accepted": False}, "sampler.revise_accepted=False is a DiffusionGemma setting"),
        (
            {"sampler__adaptive_stopping": False},
            "sampler.adaptive_stopping=False is a DiffusionGemma setting",
        ),
        ({"model__family": "diffusion_gemma"}, "model.family='diffusion_gemma' but"),
        (
            {"sampler__max_new_tokens": 20},
            "sampler.max_new_tokens=20 must be a multiple of sampler.mask.block_length=8",
        ),
        (  # values the user did not set are named with the file they came from
            {
                "model__path": "builtin:tiny-llada",
                "sampler__mask__steps": None,
                "sampler__mask__block_length": None,
                "sampler__max_new_tokens": 24,
            },
            "sampler.mask.steps=16 must be a multiple of the number of blocks (3 = max_new_tokens 24 / "
            "block_length 8); steps=16, block_length=8 come from the model's generation_config.json in ",
        ),
        (
            {"sampler__mask__top_p": 0.9},
            "sampler.mask.top_p=0.9 is a setting of Dream's algorithm: set sampler.mask.algorithm=dream",
        ),
    ],
)
def test_llada_startup_errors_name_the_key(tmp_path, caplog, llada_dir, overrides, message):
    data = write_prompts(tmp_path / "p.jsonl", 3)
    job = _llada_job(tmp_path, data, llada_dir)
    for key, value in overrides.items():
        *path, name = key.split("__")
        target = job
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    assert run(job) == 2
    assert message in caplog.text


def test_a_triton_backend_that_the_exact_path_never_runs_is_refused(tmp_path, caplog, llada_dir, monkeypatch):
    """A mask model's Triton kernels are the block caches' attention: sampler.backend=triton with
    sampler.mask.cache=none ran torch alone, while the worker's log said "triton kernels"."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend as it is taken on a GPU, on this CPU
    data = write_prompts(tmp_path / "p.jsonl", 3)
    job = _llada_job(tmp_path, data, llada_dir, sampler__backend="triton")
    job.sampler.mask.cache = "none"
    assert run(job) == 2
    assert "sampler.backend='triton' chooses the kernels of the block caches' attention" in caplog.text
    assert "Set sampler.mask.cache=prefix or dual to run them, or leave sampler.backend=auto" in caplog.text

    from pipeline import LLM

    with pytest.raises(ValueError, match=r"^backend='triton' .* with mask\.cache='none'"):
        LLM(str(llada_dir), backend="triton", max_new_tokens=NEW_TOKENS, mask={"steps": 8, "block_length": 8})
    cached = LLM(
        str(llada_dir), backend="triton", max_new_tokens=NEW_TOKENS, mask={"block_length": 8, "cache": "dual"}
    )
    assert cached.generator.sampler.backend == "triton"
