"""Values that used to pass validation and fail later: sampler.seed out of int64 range (every shard failed with
OverflowError), and nightly.* (an impossible date crashed with a traceback, a run_prefix with '/' nested the
run and hid it from retention, a negative retention_days deleted every complete night)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline import LLM
from pipeline.config import ConfigError, JobConfig, register_configs, to_job_config
from pipeline.config.schema import (
    DataConfig,
    ModelConfig,
    NightlyConfig,
    NightlyJobConfig,
    OutputConfig,
    RunConfig,
    SamplerConfig,
)
from pipeline.io.store import LocalStore
from pipeline.llm import api_message
from pipeline.runner.job import run
from pipeline.runner.nightly import date_of, run_nightly

ROOT = Path(__file__).resolve().parents[2]
register_configs()


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("seed", ["18446744073709551616", "9223372036854775808", "-1"])
def test_seed_outside_int64_fails_at_startup_naming_the_key(seed):
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", f"sampler.seed={seed}"))
    assert f"sampler.seed={seed} must be an integer from 0 to 9223372036854775807" in str(info.value)


def test_largest_seed_is_accepted():
    assert to_job_config(_compose("config", "sampler.seed=9223372036854775807")).sampler.seed == 2**63 - 1


@pytest.mark.parametrize("model", ["builtin:tiny-diffusiongemma", "builtin:tiny-llada"])
def test_a_job_with_a_too_large_seed_exits_2_before_any_work(model, tmp_path, caplog):
    """Through the Python API (no Hydra validation), for both samplers: the mask sampler (LLaDA) took it."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    job = JobConfig(
        model=ModelConfig(path=model),
        sampler=SamplerConfig(seed=2**64),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        run=RunConfig(id="r1"),
    )
    assert run(job) == 2
    assert "sampler.seed=18446744073709551616 must be an integer from 0 to" in caplog.text
    assert not (tmp_path / "out" / "r1").exists()
    with pytest.raises(ValueError, match="^seed=-1 must be an integer from 0 to"):
        LLM(model, seed=-1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "nightly.date=2026-02-30",
            "nightly.date='2026-02-30' is not a date (day is out of range for month)",
        ),
        ("nightly.date=2026-13-01", "nightly.date='2026-13-01' is not a date"),
        ("nightly.date=2026-1-5", "nightly.date='2026-1-5' is not a date (not YYYY-MM-DD)"),
        (
            "nightly.run_prefix=bad/prefix",
            "nightly.run_prefix='bad/prefix' must start with a letter or digit",
        ),
        ("nightly.run_prefix=..", "nightly.run_prefix='..' must start with a letter or digit"),
        ("nightly.run_prefix=''", "nightly.run_prefix='' must start with a letter or digit"),
        ("nightly.retention_days=-5", "nightly.retention_days=-5 must be >= 0"),
        ("nightly.lock_stale_s=0", "nightly.lock_stale_s=0.0 must be >= 150"),
        ("nightly.lock_stale_s=100", "nightly.lock_stale_s=100.0 must be >= 150 (seconds): a retried night"),
    ],
)
def test_bad_nightly_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("nightly", override), NightlyJobConfig)
    assert message in str(info.value)


def test_valid_nightly_values_pass():
    job = to_job_config(
        _compose(
            "nightly",
            "nightly.date=2028-02-29",
            "nightly.run_prefix=gen.v2",
            "nightly.retention_days=0",
            "nightly.lock_stale_s=150",  # the bound itself is enough (MIN_NIGHTLY_LOCK_STALE_S)
        ),
        NightlyJobConfig,
    )
    assert job.nightly.date == "2028-02-29" and job.nightly.retention_days == 0


def test_run_nightly_with_an_impossible_date_exits_2_without_a_traceback(tmp_path, caplog):
    job = NightlyJobConfig(output=OutputConfig(uri=str(tmp_path / "out")))
    assert run_nightly(job, NightlyConfig(date="2026-02-30")) == 2
    assert "nightly.date='2026-02-30' is not a date" in caplog.text
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists() or not LocalStore(tmp_path / "out").list("")


def test_a_hand_made_impossible_night_directory_is_not_a_night():
    assert date_of(NightlyConfig(), "nightly-2026-02-30") is None
    assert str(date_of(NightlyConfig(), "nightly-2026-02-28")) == "2026-02-28"


def test_the_nightly_lock_outlasts_the_run_lock_it_wraps():
    from pipeline.config.validate import MIN_NIGHTLY_LOCK_STALE_S
    from pipeline.runner.job import RUN_LOCK_STALE_S

    assert MIN_NIGHTLY_LOCK_STALE_S == RUN_LOCK_STALE_S + RUN_LOCK_STALE_S / 4  # + one run-lock heartbeat


def test_a_checkpoint_max_length_the_sampler_ignores_is_logged_at_startup(tmp_path, caplog):
    """A generation_config.json with max_length (a per-row budget in transformers' generate) and no
    max_new_tokens: the job says once, before any work, that every row gets sampler.max_new_tokens."""
    from pipeline.models.tiny import TINY_GENERATION_CONFIG
    from pipeline.runner.plan import plan
    from tests.support.models import build_checkpoint

    generation = {k: v for k, v in TINY_GENERATION_CONFIG.items() if k != "max_new_tokens"}
    model = build_checkpoint(tmp_path / "m", generation_config={**generation, "max_length": 40})
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    job = JobConfig(
        model=ModelConfig(path=str(model)),
        data=DataConfig(path=str(data), apply_chat_template=False),
        output=OutputConfig(uri=str(tmp_path / "out")),
        run=RunConfig(id="r1"),
    )
    with caplog.at_level("WARNING"):
        prep = plan(job)
    assert prep.settings["max_new_tokens"] == 256
    assert "generation_config.json sets max_length=40" in caplog.text
    caplog.clear()
    job.sampler = SamplerConfig(max_new_tokens=16)
    with caplog.at_level("WARNING"):
        plan(job)
    assert "max_length" not in caplog.text
    with caplog.at_level("WARNING"):
        LLM(str(model), max_new_tokens=16)
    assert "max_length" not in caplog.text
    with caplog.at_level("WARNING"):
        assert LLM(str(model)).settings.max_new_tokens == 256
    assert "generation_config.json sets max_length=40" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.worker_start_timeout_s=-1", "cluster.worker_start_timeout_s=-1.0 must be > 0"),
        ("cluster.worker_start_timeout_s=0", "cluster.worker_start_timeout_s=0.0 must be > 0"),
        ("cluster.worker_start_timeout_s=nan", "cluster.worker_start_timeout_s=nan must be > 0"),
        ("run.progress_interval_s=nan", "run.progress_interval_s=nan must be > 0"),
        ("run.shard_timeout_s=nan", "run.shard_timeout_s=nan must be > 0"),
        ("cluster.num_cpus_per_worker=nan", "cluster.num_cpus_per_worker=nan must be >= 0"),
        ("cluster.num_gpus_per_worker=nan", "cluster.num_gpus_per_worker=nan must be >= 0"),
    ],
)
def test_bad_durations_and_resources_fail_at_startup_naming_the_key(override, message):
    """They passed validation (NaN compares false with everything; worker_start_timeout_s was not checked):
    the job started Ray and wrote the run directory, then gave up on the workers at once."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", override))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "cluster.num_cpus_per_worker=inf",
            "cluster.num_cpus_per_worker=inf must be >= 0 and at most 1e+14 (Ray's limit)",
        ),
        (
            "cluster.num_cpus_per_worker=1e16",
            "cluster.num_cpus_per_worker=1e+16 must be >= 0 and at most 1e+14 (Ray's limit)",
        ),
        (
            "cluster.num_gpus_per_worker=inf",
            "cluster.num_gpus_per_worker=inf must be >= 0 and at most 1e+14 (Ray's limit)",
        ),
        (
            "cluster.worker_start_timeout_s=inf",
            "cluster.worker_start_timeout_s=inf must be > 0 (seconds) and at most 1e+09",
        ),
        (
            "cluster.worker_start_timeout_s=1e300",
            "cluster.worker_start_timeout_s=1e+300 must be > 0 (seconds) and at most 1e+09",
        ),
    ],
)
def test_infinite_or_huge_resources_and_start_timeout_fail_at_startup(override, message):
    """num_cpus_per_worker=inf passed validation, then the job died with a traceback (OverflowError: cannot
    convert float infinity to integer) as it sized the local Ray instance; worker_start_timeout_s=inf started
    Ray and the workers, then "worker 0 failed to start: cannot convert float infinity to integer"."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", override))
    assert message in str(info.value)


@pytest.mark.parametrize("workers", ["100000000000000000000000", "1000000000000000", "10001"])
def test_an_absurd_worker_count_fails_at_startup_naming_the_key(workers):
    """cluster.num_workers=10**23 passed validation, then failed as Ray started: "could not start a local Ray
    instance: ValueError: Resource quantities must be at most 1e14 ... check that this folder is writable"
    (exit 2, naming neither the key nor the fix); 10**15 the same. It has an upper bound, Ray's scale."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", f"cluster.num_workers={workers}"))
    assert str(info.value).startswith(
        f"cluster.num_workers={workers} is more workers than Ray runs: give at most 10,000"
    )
    assert to_job_config(_compose("config", "cluster.num_workers=10000")).cluster.num_workers == 10_000


def test_the_largest_resources_and_start_timeout_pass():
    job = to_job_config(
        _compose(
            "config",
            "cluster=ray",
            "cluster.num_cpus_per_worker=1e14",
            "cluster.num_gpus_per_worker=0",
            "cluster.worker_start_timeout_s=1e9",
        )
    )
    assert job.cluster.worker_start_timeout_s == 1e9


def test_a_local_instance_over_rays_cpu_limit_is_refused_before_ray_starts(tmp_path):
    """cluster.mode=local sizes the Ray instance to num_workers x num_cpus_per_worker + 1 CPUs: 1e14 per worker
    (the per-worker limit) passed, and the job failed as Ray refused the instance, saying "could not start a
    local Ray instance ... check that this folder is writable"."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    out = tmp_path / "out"
    overrides = [f"data.path={data}", f"output.uri={out}", "cluster.num_workers=2"]
    with pytest.raises(ConfigError) as error:
        to_job_config(_compose("config", *overrides, "cluster.num_cpus_per_worker=1e14"))
    assert str(error.value) == (
        "cluster.num_workers=2 x cluster.num_cpus_per_worker=1e+14 (+1 for the driver) is 2e+14 CPUs for the "
        "local Ray instance, more than Ray's limit of 1e+14: lower either"
    )
    job = to_job_config(_compose("config", *overrides, "cluster.num_cpus_per_worker=1e13"))
    assert job.cluster.num_cpus_per_worker == 1e13


def test_a_negative_worker_start_timeout_writes_nothing(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    out = tmp_path / "out"
    cfg = _compose(
        "config", f"data.path={data}", f"output.uri={out}", "run.id=r1", "cluster.worker_start_timeout_s=-1"
    )
    from pipeline.runner.job import run_from_hydra

    assert run_from_hydra(cfg) == 2
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize(
    ("data_path", "output_uri"),
    [
        ("{tmp}/prompts", "{tmp}/prompts/out"),
        ("{tmp}/prompts", "{tmp}/prompts"),
        ("{tmp}/prompts/", "{tmp}/prompts/./runs/../out"),
        ("s3://bucket/in", "s3://bucket/in/runs"),
        ("s3://bucket/in/", "s3://bucket/in"),
        ("s3://bucket", "s3://bucket/runs"),
    ],
)
def test_an_output_inside_the_input_directory_fails_at_startup(tmp_path, data_path, output_uri):
    """The run's files (data/*.parquet, _manifest.json, stats.json) under the input directory were read as
    input by the next run of the same command: it failed ('cannot tell the format from [jsonl, parquet]'), or
    with data.format=parquet took the previous outputs as prompts, instead of resuming."""
    data_path, output_uri = data_path.format(tmp=tmp_path), output_uri.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("config", f"data.path={data_path}", f"output.uri={output_uri}"))
    assert f"output.uri={output_uri!r} is inside data.path={data_path!r}" in str(info.value)


@pytest.mark.parametrize(
    ("data_path", "output_uri"),
    [
        ("{tmp}/runs/r1/data", "{tmp}/runs"),  # a previous run's output as input: fine
        ("{tmp}/prompts", "{tmp}/prompts-out"),
        ("{tmp}/prompts.jsonl", "{tmp}/out"),
        ("s3://bucket/in", "s3://bucket/in-runs"),
        ("s3://bucket/in", "s3://other/in/runs"),
        ("builtin:prompts", "builtin:prompts/x"),
    ],
)
def test_an_output_beside_or_above_the_input_passes(tmp_path, data_path, output_uri):
    data_path, output_uri = data_path.format(tmp=tmp_path), output_uri.format(tmp=tmp_path)
    to_job_config(_compose("config", f"data.path={data_path}", f"output.uri={output_uri}"))


@pytest.mark.parametrize("overwrite", [True, False])
def test_an_input_inside_the_runs_own_directory_is_refused_and_kept(tmp_path, caplog, overwrite):
    """A run read from its own directory (a previous output of the same run.id as input): with
    run.overwrite=true the run deleted the input it had just read (580 of 600 rows gone, exit 0)."""
    source = tmp_path / "out" / "r1" / "data" / "part.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join(json.dumps({"prompt": f"Add: {i}+1"}) + "\n" for i in range(3)))
    job = JobConfig(
        model=ModelConfig(path="builtin:tiny-diffusiongemma-random"),
        data=DataConfig(path=str(source.parent)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        run=RunConfig(id="r1", overwrite=overwrite),
    )
    assert run(job) == 2
    assert (
        f"data.path={str(source.parent)!r} is inside this run's directory {tmp_path / 'out' / 'r1'}"
        in caplog.text
    )
    assert sorted(p.name for p in (tmp_path / "out" / "r1").rglob("*")) == ["data", "part.jsonl"]
    # Another run.id beside it reads the same input.
    job.run.id = "r2"
    job.run.dry_run = True
    assert run(job) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA device")
@pytest.mark.parametrize(
    ("model", "sampler", "message"),
    [
        (
            ModelConfig(device="cuda"),
            SamplerConfig(),
            "model.device=cuda needs a CUDA device and this machine has none (cluster.mode=local runs the "
            "workers here); use model.device=auto",
        ),
        (
            ModelConfig(),
            SamplerConfig(backend="triton"),
            "sampler.backend=triton needs a CUDA device and this machine has none (cluster.mode=local runs "
            "the workers here); use sampler.backend=auto (or TRITON_INTERPRET=1",
        ),
    ],
    ids=["device", "backend"],
)
def test_a_cuda_setting_on_a_local_machine_without_cuda_exits_2_before_ray_or_the_run(
    model, sampler, message, tmp_path, caplog, monkeypatch
):
    """It failed only once the workers had started, after Ray was up and _run.json/_config.yaml written."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    job = JobConfig(
        model=model,
        sampler=sampler,
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        run=RunConfig(id="r1"),
    )
    with caplog.at_level("INFO"):
        assert run(job) == 2
    assert message in caplog.text
    # No Ray started for it (another test in this process may have one running) and no run written.
    assert "starting a local Ray instance" not in caplog.text and "worker(s)" not in caplog.text
    assert not (tmp_path / "out" / "r1").exists()


@pytest.mark.parametrize(
    ("sampler", "model", "message"),
    [
        # the tiny model's context window is 1024 tokens; a completion takes whole canvases
        (
            SamplerConfig(canvas_length=2048, max_new_tokens=32),
            ModelConfig(),
            "sampler.max_new_tokens=32 in canvases of sampler.canvas_length=2048 (2048 positions) leaves no room "
            "for a prompt in the model's context window of 1024 tokens",
        ),
        (
            SamplerConfig(canvas_length=400, max_new_tokens=700),
            ModelConfig(max_prompt_tokens=300),
            "model.max_prompt_tokens=300 plus sampler.max_new_tokens=700 in canvases of sampler.canvas_length=400 "
            "(800 positions) exceeds the model's context window of 1024 tokens",
        ),
    ],
    ids=["canvas", "canvases"],
)
def test_canvases_that_reach_past_the_context_window_exit_2(sampler, model, message, tmp_path, caplog):
    """sampler.canvas_length=2048 on a model with a 1024-token context window ran, exit 0, with no warning:
    only max_new_tokens was checked against the window, not the canvases that hold it."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    model.path = "builtin:tiny-diffusiongemma-random"
    job = JobConfig(
        model=model,
        sampler=sampler,
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "o")),
    )
    assert run(job) == 2
    assert message in caplog.text
    with pytest.raises(ValueError, match=re.escape(api_message(message))):  # the API's keywords
        LLM(
            model.path,
            max_prompt_tokens=model.max_prompt_tokens,
            canvas_length=sampler.canvas_length,
            max_new_tokens=sampler.max_new_tokens,
        )


def test_a_batch_the_device_cannot_hold_fails_the_workers_start_naming_the_setting():
    """sampler.batch_size=100000000 passed start-up and the dry run, then every shard failed three times with
    'DefaultCPUAllocator: can't allocate memory' and the job asked to be rerun (exit 1). The worker's start
    fails, in one line: the error is kept and raised by its calls, not by its creation (which Ray reported
    with the actor's whole traceback)."""
    from pipeline.generation import GenerationSpec
    from pipeline.runner.pool import WorkerNotStarted
    from pipeline.runner.worker import ShardWorker

    spec = GenerationSpec(model_path="builtin:tiny-diffusiongemma-random", batch_size=100_000_000)
    worker = ShardWorker(spec, None, compression="zstd", name="w0", torch_threads=None)
    with pytest.raises(
        WorkerNotStarted,
        match=r"^pipeline.generation.SlotsDoNotFit: the sampler's 100000000 slots \(sampler.batch_size\) and ",
    ):
        worker.ready()
