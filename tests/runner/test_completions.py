"""Several completions per prompt (sampler.completions_per_prompt): the real job on local Ray workers, the
Python API, and the keys that keep each completion's randomness apart."""

from __future__ import annotations

import json

import pytest

from pipeline import LLM
from pipeline.data.readers import read_input
from pipeline.kernels import rng
from pipeline.runner.job import run
from tests.runner.test_job import NEW_TOKENS, STEPS, make_job, read_parts, write_prompts

pytestmark = pytest.mark.ray


def test_each_prompt_gets_its_completions_and_the_first_is_the_single_completion(tmp_path, ray_local, caplog):
    """8 good prompts and a malformed line, 4 completions each, the postprocess dropping completion 1 and giving
    completion 3 a value of the wrong type: 16 rows (completions 0 and 2 of each prompt), one read error and 16
    postprocess errors naming their completion; completion 0 of every prompt is the row a run with one
    completion writes."""
    data = write_prompts(tmp_path / "prompts.jsonl", 8, extra=["{not json"])
    job = make_job(tmp_path, data, sampler__completions_per_prompt=4)
    job.postprocess = {"_target_": "tests.runner.postprocess_fns.by_completion"}
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    rows = read_parts(run_dir).to_pylist()
    # one completion per prompt, as a run with the default completions_per_prompt=1 makes them (same ids)
    good = [r for r in read_input(job.data).table.to_pylist() if r["error"] is None]
    llm = LLM("builtin:tiny-diffusiongemma-random", max_denoising_steps=STEPS, max_new_tokens=NEW_TOKENS)
    outs = llm.generate([r["prompt"] for r in good], ids=[r["id"] for r in good])
    single = {out.id: out for out in outs}
    assert sorted((r["id"], r["completion_index"]) for r in rows) == sorted(
        (rid, c) for rid in single for c in (0, 2)
    )
    by_key = {(r["id"], r["completion_index"]): r for r in rows}
    for rid, out in single.items():
        first = by_key[rid, 0]
        assert (first["completion"], first["denoising_steps"]) == (out.completion, out.denoising_steps)
        assert first["source_index"] == by_key[rid, 2]["source_index"]
    assert any(by_key[rid, 0]["completion"] != by_key[rid, 2]["completion"] for rid in single)

    errors = read_parts(run_dir, "errors").to_pylist()
    assert sorted(e["stage"] for e in errors) == ["postprocess"] * 16 + ["read"]
    reasons = sorted(e["reason"].split(" by ")[0].split(" returned")[0] for e in errors if e["id"] in single)
    assert (
        reasons
        == ["completion 1: filtered out"] * 8
        + ["completion 3: tests.runner.postprocess_fns.by_completion"] * 8
    )

    stats = json.loads((run_dir / "stats.json").read_text())
    assert (stats["rows_in"], stats["rows_out"], stats["completions_per_prompt"]) == (9, 16, 4)
    assert stats["this_invocation"]["rows"] == 9  # input rows, as the progress line counts them
    assert json.loads((run_dir / "_manifest.json").read_text())["completions_per_prompt"] == 4
    assert (
        "| completions per prompt (`completion_index` 0-3, each keyed apart) | 4 |"
        in (run_dir / "README.md").read_text()
    )
    assert "progress: 9/9 rows (100.0%)" in caplog.text  # input rows, not completions


def test_the_api_returns_each_prompts_completions_in_order():
    prompts = ["Add: 12+30", "", "Sort: 3 1 2"]
    single = LLM("builtin:tiny-diffusiongemma-random", max_denoising_steps=4, max_new_tokens=32)
    llm = LLM(
        "builtin:tiny-diffusiongemma-random",
        max_denoising_steps=4,
        max_new_tokens=32,
        completions_per_prompt=2,
    )
    ones = single.generate(prompts, ids=["a", "b", "c"])
    pairs = llm.generate(prompts, ids=["a", "b", "c"])
    assert [[c.completion_index for c in pair] for pair in pairs] == [[0, 1]] * 3
    for one, pair in zip(ones, pairs, strict=True):
        assert pair[0].completion == one.completion and pair[0].id == pair[1].id == one.id
    assert all(c.finish_reason == "error" and "empty" in c.error for c in pairs[1])
    assert (
        pairs[0][0].completion != pairs[0][1].completion or pairs[2][0].completion != pairs[2][1].completion
    )
    with pytest.raises(Exception, match="completions_per_prompt=0 must be an integer from 1 to 10000"):
        LLM("builtin:tiny-diffusiongemma-random", completions_per_prompt=0)


def test_completion_zero_keeps_the_rows_key_and_others_get_keys_of_their_own():
    assert rng.row_key(0, "row-7", 0) == rng.row_key(0, "row-7")
    keys = {rng.row_key(0, row_id, c) for row_id in ("a", "a1", "1a", "a:1", "b") for c in range(4)}
    assert len(keys) == 20
    assert rng.row_key(0, "a", 1) != rng.row_key(1, "a", 1)


def test_several_completions_of_a_deterministic_mask_sampler_are_refused_at_startup(tmp_path, caplog):
    """LLaDA's defaults (temperature 0, low_confidence) give one completion per prompt whatever its key: asking
    for several would write copies at n times the cost."""
    data = write_prompts(tmp_path / "p.jsonl", 3)
    job = make_job(tmp_path, data, model__path="builtin:tiny-llada", sampler__completions_per_prompt=2)
    job.sampler.max_denoising_steps, job.sampler.max_new_tokens = None, None  # the model's own settings
    assert run(job) == 2
    assert "sampler.completions_per_prompt=2 would give 2 identical completions" in caplog.text
    with pytest.raises(ValueError, match="would give 3 identical completions"):
        LLM("builtin:tiny-llada", completions_per_prompt=3)
    sampled = LLM("builtin:tiny-llada", completions_per_prompt=2, mask={"temperature": 0.8})
    first, second = sampled.generate(["Add: 12+30"])[0]
    assert (first.completion_index, second.completion_index) == (0, 1)


def test_a_seed_that_a_deterministic_mask_sampler_ignores_is_refused_at_startup(tmp_path, caplog):
    """sampler.seed=7 with LLaDA's defaults (temperature 0, low_confidence) ran, wrote seed 7 in every row and
    gave the completions of seed 0: a run meant as a new sample of the data was a copy of the first."""
    data = write_prompts(tmp_path / "p.jsonl", 3)
    job = make_job(tmp_path, data, model__path="builtin:tiny-llada", sampler__seed=7)
    job.sampler.max_denoising_steps, job.sampler.max_new_tokens = None, None  # the model's own settings
    assert run(job) == 2
    assert "sampler.seed=7 changes nothing: this mask sampler is deterministic" in caplog.text
    assert "leave sampler.seed unset (0)" in caplog.text
    with pytest.raises(ValueError, match=r"^seed=3 changes nothing: .* Set mask\.temperature > 0"):
        LLM("builtin:tiny-llada", seed=3)
    assert LLM("builtin:tiny-llada", seed=3, mask={"temperature": 1.0}).settings.seed == 3, "a seed that acts"
