"""model.dtype=auto is resolved once per run: a run's rows come from one precision whichever workers run it.
A run started on CPU workers (float32) and resumed on GPU workers (bfloat16 under auto) passed the identity
check (its config says `auto` both times) and mixed the two precisions in one dataset."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.runner.job import keep_run_dtype, prepare, run
from tests.runner.test_job import make_job, write_prompts


def _run_file(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "test-run" / "_run.json").read_text())


@pytest.mark.parametrize(
    ("device", "gpus", "dtype"),
    [("auto", 0, "float32"), ("auto", 1, "bfloat16"), ("auto", 0.5, "bfloat16"), ("cpu", 1, "float32")],
)
def test_a_new_run_records_the_dtype_its_workers_load_the_model_in(tmp_path, device, gpus, dtype):
    prep = prepare(make_job(tmp_path, write_prompts(tmp_path / "p.jsonl", 4), model__device=device))
    identity = _run_file(tmp_path)
    keep_run_dtype(prep, gpus)
    assert prep.spec.dtype == dtype
    assert _run_file(tmp_path) == {**identity, "dtype": dtype}, "the identity is kept, the dtype added"


def test_a_resume_on_other_workers_keeps_the_runs_dtype_and_says_so(tmp_path, caplog):
    data = write_prompts(tmp_path / "p.jsonl", 4)
    keep_run_dtype(prepare(make_job(tmp_path, data)), gpus=0)  # started on CPU workers
    # Stopped before any shard was committed (to give the workers GPUs, as the job advises when the cluster has
    # none yet): the next start decides, silently.
    again = prepare(make_job(tmp_path, data))
    with caplog.at_level(logging.WARNING, logger="canvasflow"):
        keep_run_dtype(again, gpus=1)
    assert again.spec.dtype == "bfloat16" and _run_file(tmp_path)["dtype"] == "bfloat16"
    assert "was started in" not in caplog.text
    keep_run_dtype(prepare(make_job(tmp_path, data)), gpus=0)  # back on CPU workers, which commit a shard
    (tmp_path / "out" / "test-run" / "_commits").mkdir()
    (tmp_path / "out" / "test-run" / "_commits" / "shard-00000.json").write_text("{}")
    resumed = prepare(make_job(tmp_path, data))
    assert resumed.status == "resume"
    with caplog.at_level(logging.WARNING, logger="canvasflow"):
        keep_run_dtype(resumed, gpus=1)  # resumed where each worker gets a GPU
    assert resumed.spec.dtype == "float32" and _run_file(tmp_path)["dtype"] == "float32"
    assert (
        "model.dtype=auto: run test-run was started in float32, which its workers keep (one precision per run), "
        "though on these workers (GPU) auto means bfloat16. Use a new run.id to generate in bfloat16."
    ) in caplog.text
    explicit = prepare(make_job(tmp_path / "b", data, model__dtype="bfloat16"))
    keep_run_dtype(explicit, gpus=0)  # an explicit dtype is the user's, on any device
    assert explicit.spec.dtype == "bfloat16"


@pytest.mark.ray
def test_a_run_records_its_dtype_in_the_run_file_and_the_manifest(tmp_path, ray_local, caplog):
    data = write_prompts(tmp_path / "p.jsonl", 4)
    with caplog.at_level(logging.INFO, logger="canvasflow"):
        assert run(make_job(tmp_path, data, cluster__num_workers=1)) == 0
    run_dir = tmp_path / "out" / "test-run"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert _run_file(tmp_path)["dtype"] == manifest["dtype"] == "float32"
    # what the workers loaded, in the log and in stats.json
    assert "ready on " in caplog.text and "(cpu, torch kernels, float32, model loaded in " in caplog.text
    stats = json.loads((run_dir / "stats.json").read_text())
    assert [w["dtype"] for w in stats["workers"]] == ["float32"]
