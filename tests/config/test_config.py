"""Configuration: every group composes, typos and bad values fail at start-up naming the key, and the CLI
answers --help and --cfg job without loading a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import ConfigError, JobConfig, register_configs, to_job_config

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_compose_to_a_valid_job():
    job = to_job_config(_compose())
    assert isinstance(job, JobConfig)
    assert job.model.path == "builtin:tiny-diffusiongemma"
    assert job.data.path == "builtin:prompts"
    assert job.output.uri == "./outputs"
    assert job.cluster.mode == "local"
    assert job.run.id is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["cluster=ray"],
        ["output=s3", "output.uri=s3://bucket/prefix"],
        ["model=diffusiongemma_26b", "model.path=/models/dg"],
        ["postprocess=task_checker"],
        ["sampler.batching=static", "sampler.backend=torch"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_group_option_composes(overrides):
    job = to_job_config(_compose(*overrides))
    if "postprocess=task_checker" in overrides:
        assert job.postprocess["_target_"] == "pipeline.tasks.checker.check_row"


def test_required_keys_exist_with_their_names():
    cfg = _compose()
    for key in (
        "model.path",
        "data.path",
        "data.prompt_column",
        "data.id_column",
        "output.uri",
        "run.id",
        "cluster.num_workers",
        "sampler.max_new_tokens",
        "sampler.max_denoising_steps",
        "sampler.t_min",
        "sampler.t_max",
        "sampler.entropy_bound",
        "sampler.stability_threshold",
        "sampler.confidence_threshold",
        "sampler.seed",
    ):
        assert OmegaConf.select(cfg, key, throw_on_missing=False, default="<absent>") != "<absent>", key


def test_typo_fails_naming_the_key():
    with pytest.raises(Exception, match="max_denoising_step"):
        _compose("sampler.max_denoising_step=3")


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(Exception, match="sampler.seed"):
        _compose("sampler.seed=abc")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sampler.t_min=0.5", "sampler.t_max=0.4"],
            "sampler.t_max=0.4 must be greater than sampler.t_min=0.5",
        ),
        (["cluster.num_workers=0"], "cluster.num_workers=0 must be a positive integer"),
        (["sampler.batching=dynamic"], "sampler.batching='dynamic' is not one of continuous, static"),
        (["run.id=../escape"], "run.id='../escape' must start with a letter or digit"),
        (["cluster=ray", "cluster.address=null"], "cluster.address=None is required with cluster=ray"),
        (
            ["postprocess=task_checker", "postprocess._target_=nodots"],
            "postprocess._target_='nodots' must name a callable",
        ),
        (["sampler.max_denoising_steps=-1"], "sampler.max_denoising_steps=-1 must be a positive integer"),
        (["run.shard_timeout_s=0"], "run.shard_timeout_s=0.0 must be > 0 (or null for no limit)"),
        # zero is no valid count or duration: the bounds are strict
        (["run.max_shard_attempts=0"], "run.max_shard_attempts=0 must be a positive integer"),
        (["data.limit=0"], "data.limit=0 must be a positive integer (or null for the default)"),
        (["run.progress_interval_s=0"], "run.progress_interval_s=0.0 must be > 0"),
        (["data.prompt_column=''"], "data.prompt_column='' must not be empty"),
        (["run.id=" + "a" * 129], "must start with a letter or digit and use only letters"),  # 128 at most
    ],
)
def test_impossible_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose(*overrides))
    assert message in str(info.value)


def test_a_run_id_of_128_characters_is_the_longest_accepted():
    assert to_job_config(_compose("run.id=" + "a" * 128)).run.id == "a" * 128


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_cli_help_and_cfg_job_load_nothing_heavy():
    helped = _cli("--help")
    assert helped.returncode == 0 and "sampler" in helped.stdout
    # A model path that does not exist proves --cfg job loads no model; -X importtime shows no torch import.
    shown = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(ROOT / "jobs" / "generate.py"),
            "--cfg",
            "job",
            "model.path=/does/not/exist",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "path: /does/not/exist" in shown.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0] for line in shown.stderr.splitlines() if "|" in line
    }
    assert not imported & {"torch", "transformers", "ray", "pyarrow"}, sorted(imported & {"torch", "ray"})


def test_cli_typo_exits_nonzero_naming_the_key():
    result = _cli("sampler.max_denoising_step=3")
    assert result.returncode != 0
    assert "max_denoising_step" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["output=s3"], "output.uri"),
        (["model=llada", "sampler=llada"], "model.path"),
        (["model=diffusiongemma_26b"], "model.path"),
        (["postprocess=callable"], "postprocess._target_"),
    ],
)
def test_a_value_a_group_option_leaves_to_the_user_is_required(overrides, key):
    """`???` in a group option (conf/output/s3.yaml's uri, the big models' path) merged onto the schema's
    default kept the default: output=s3 without output.uri wrote the run to ./outputs on local disk, and
    model=llada without model.path ran the builtin tiny DiffusionGemma."""
    with pytest.raises(ConfigError, match=rf"^{key} has no value: set {key}="):
        to_job_config(_compose(*overrides))


def test_output_s3_without_a_uri_exits_2_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "output=s3", "run.id=r1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-2000:]
    assert "output.uri has no value: set output.uri=" in log and "Traceback" not in log
    assert list(tmp_path.iterdir()) == []
