"""Exit code 2 ("could not start") for every failure before the job starts, as the README says: a config that
Hydra cannot compose (it exits 1 by itself), a key added with '+' outside the free-form dicts (was silently
ignored), and unexpected errors while preparing the run (a traceback and exit 1 before)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.runner.model_check as model_check
from pipeline.config.schema import (
    ClusterConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    NightlyJobConfig,
    OutputConfig,
    RunConfig,
)
from pipeline.config.store import check_text_overrides
from pipeline.models.loader import resolve_model_dir
from pipeline.runner.job import run

ROOT = Path(__file__).resolve().parents[2]


def _cli(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("generate.py", "sampler.bogus=1", "sampler.bogus is not a configuration key: fix its spelling"),
        ("generate.py", "+sampler.bogus=1", "sampler.bogus is not a configuration key"),
        ("generate.py", "sampler.batch_size=abc", "sampler.batch_size got a value of the wrong type"),
        ("generate.py", "model=nope", "A group option does not exist"),
        ("nightly.py", "nightly.bogus=1", "nightly.bogus is not a configuration key"),
        ("nightly.py", "nightly.retention_days=abc", "nightly.retention_days got a value of the wrong type"),
    ],
)
def test_config_that_does_not_compose_exits_2_naming_the_key(tmp_path, script, override, message):
    code, log = _cli(script, f"output.uri={tmp_path / 'out'}", override, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert message in log
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        (
            "generate.py",
            "run.id=1.10",
            "run.id=1.10 is read by Hydra as the number 1.1, which as text is '1.1'",
        ),
        ("generate.py", "run.id=true", "run.id=true is read by Hydra as the boolean True"),
        (
            "nightly.py",
            "nightly.run_prefix=2024.10",
            "nightly.run_prefix=2024.10 is read by Hydra as the number",
        ),
    ],
)
def test_a_text_key_given_a_number_that_changes_as_text_exits_2(tmp_path, script, override, message):
    """run.id=1.10 wrote the run to <output.uri>/1.1 (run.id=1e3 to 1000.0, run.id=true to True): Hydra reads the
    value as a number or boolean and OmegaConf turns it back into other text. Now the job refuses it, saying how
    to quote it; quoted, the value is kept as typed."""
    code, log = _cli(script, f"output.uri={tmp_path / 'out'}", override, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert message in log and "quote the value to keep it as typed" in log
    assert not (tmp_path / "out").exists()
    if script == "generate.py" and override == "run.id=1.10":
        code, log = _cli(
            script, f"output.uri={tmp_path / 'out'}", 'run.id="1.10"', "run.dry_run=true", cwd=tmp_path
        )
        assert code == 0 and f"run 1.10 at {tmp_path / 'out' / '1.10'}" in log, log[-2000:]


@pytest.mark.parametrize(
    "override",
    ["run.overwrite=2", "run.overwrite=-1", "run.dry_run=0", "run.dry_run='yes'", "sampler.cuda_graphs=1.5"],
)
def test_a_boolean_key_given_anything_but_true_or_false_is_refused(override):
    """run.overwrite=2 (or -1, 1.5, 'yes') composed as run.overwrite=True: OmegaConf reads any number and some
    words as a boolean, and overwrite=True deletes a run whose input or config differ."""
    key, typed = override.split("=", 1)
    with pytest.raises(ConfigError) as info:
        check_text_overrides([override])
    assert str(info.value) == f"{key}={typed} is not a boolean: write {key}=true or {key}=false"


def test_boolean_keys_take_true_false_and_null_where_optional():
    check_text_overrides(["run.overwrite=true", "run.dry_run=False", "sampler.cuda_graphs=TRUE"])
    check_text_overrides(["nightly.allow_late=false"], NightlyJobConfig)


def test_a_boolean_key_given_an_interpolation_is_left_to_omegaconf():
    """run.overwrite=${oc.env:OVERWRITE,false} is a string to Hydra's parser; OmegaConf resolves it to a
    boolean, as it did before boolean overrides were checked."""
    check_text_overrides(
        ["run.overwrite=${oc.env:CANVASFLOW_OVERWRITE,false}", "run.dry_run='${oc.env:X,true}'"]
    )


def test_a_job_given_a_number_for_a_boolean_key_exits_2(tmp_path):
    code, log = _cli("generate.py", f"output.uri={tmp_path / 'out'}", "run.overwrite=2", cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert "run.overwrite=2 is not a boolean: write run.overwrite=true or run.overwrite=false" in log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


# A bug while preparing the run, injected: inspecting the model raises an AttributeError. (Every input that
# once did this is now a clear error of its own, like a config.json that is not an object below.)
def _buggy_inspect(*args, **kwargs):
    raise AttributeError("'list' object has no attribute 'get' (injected)")


def _inject_bug(tmp_path: Path) -> dict[str, str]:
    """The environment of a job whose process gets the bug at startup, through a sitecustomize module."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import pipeline.runner.model_check as model_check\n"
        "def _buggy_inspect(*args, **kwargs):\n"
        "    raise AttributeError(\"'list' object has no attribute 'get' (injected)\")\n"
        "model_check.inspect_model = _buggy_inspect\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"model_type": "diffusion_gemma",', " is not valid JSON"),
        (b'["diffusion_gemma"]', " is not a JSON object"),
        (b'{"model_type": "diffusion_gemma\xff"}', " is not valid UTF-8"),
        (
            b'{"model_type": "diffusion_gemma", "text_config": []}',
            ": text_config must be an object, got list",
        ),
    ],
)
def test_an_unreadable_model_config_exits_2_naming_the_file_without_a_traceback(tmp_path, content, problem):
    """A truncated or non-object config.json (or text_config) in model.path is the user's error: it ended in a
    JSONDecodeError (or AttributeError) traceback as if canvasflow had a bug."""
    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("builtin:tiny-diffusiongemma"), model)
    (model / "config.json").write_bytes(content)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    code, log = _cli(
        "generate.py",
        f"output.uri={tmp_path / 'out'}",
        f"data.path={data}",
        f"model.path={model}",
        cwd=tmp_path,
    )
    assert code == 2, log[-2000:]
    assert f"{model / 'config.json'}{problem}" in log
    assert "Traceback" not in log
    assert not (tmp_path / "out").exists()


def test_unexpected_error_while_preparing_exits_2_with_its_traceback(tmp_path, caplog, monkeypatch):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    monkeypatch.setattr(model_check, "inspect_model", _buggy_inspect)
    job = JobConfig(
        model=ModelConfig(path="builtin:tiny-diffusiongemma"),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(id="r1"),
    )
    assert run(job) == 2
    assert "could not start (exit code 2): unexpected error while preparing the run" in caplog.text
    assert "AttributeError" in caplog.text


@pytest.mark.parametrize("script", ["generate.py", "nightly.py"])
def test_cli_unexpected_startup_error_exits_2(tmp_path, script):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    args = [f"output.uri={tmp_path / 'out'}", f"data.path={data}"]
    code, log = _cli(script, *args, cwd=tmp_path, env=_inject_bug(tmp_path))
    assert code == 2, log[-2000:]
    assert "could not start (exit code 2)" in log and "AttributeError" in log


@pytest.mark.parametrize(
    ("script", "override"),
    [
        ("generate.py", "postprocess._target_=pipeline.tasks.checker.check_row"),
        ("generate.py", "+postprocess.drop_incorrect=true"),
        ("nightly.py", "++postprocess.drop_incorrect=true"),
    ],
)
def test_postprocess_key_without_a_postprocess_option_exits_2_without_a_traceback(tmp_path, script, override):
    """With no postprocess option chosen the postprocess node is null, and Hydra crashed setting a key in it
    (AssertionError: Unexpected type for root: NoneType, with its traceback)."""
    code, log = _cli(script, f"output.uri={tmp_path / 'out'}", override, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert "Traceback" not in log and "AssertionError" not in log, log[-2000:]
    assert "no postprocess option is chosen" in log and "postprocess=callable" in log
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "key", "field"),
    [
        (
            ["data.format=hf", "data.path=hf:json", "data.hf_kwargs.data_files=/tmp/d/chat.jsonl"],
            "data.hf_kwargs.data_files",
            "data.hf_kwargs",
        ),
        (
            ["postprocess=callable", "postprocess._target_=m.f", "postprocess.threshold=1"],
            "postprocess.threshold",
            "postprocess",
        ),
    ],
)
def test_a_new_key_under_a_free_form_dict_without_plus_says_to_add_the_plus(tmp_path, overrides, key, field):
    """The key was right but lacked the '+' that a key new to a dict-typed field needs: canvasflow told the
    user to fix its spelling."""
    code, log = _cli("generate.py", f"output.uri={tmp_path / 'out'}", *overrides, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert f"{key} is a new key under {field}, whose keys are free-form: add it with a '+', +{key}=..." in log
    assert "fix its spelling" not in log


def test_postprocess_key_with_a_postprocess_option_still_composes(tmp_path):
    code, log = _cli(
        "generate.py",
        "postprocess=task_checker",
        "postprocess.drop_incorrect=true",
        "--cfg",
        "job",
        cwd=tmp_path,
    )
    assert code == 0, log[-2000:]
    assert "drop_incorrect: true" in log


def test_an_unreachable_ray_cluster_exits_2_naming_the_address(tmp_path):
    """cluster=ray with an address where no Ray head listens hung in ray.init for minutes (Ctrl-C ignored),
    repeating "Failed to connect to GCS"."""
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    args = [f"output.uri={tmp_path / 'out'}", f"data.path={data}", "cluster=ray"]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        code, log = _cli("generate.py", *args, f"cluster.address={address}", cwd=tmp_path)
        assert code == 2, log[-2000:]
        assert f"cannot reach the Ray cluster at cluster.address='{address}'" in log
        assert "Traceback" not in log
    # cluster.address=auto stands for RAY_ADDRESS when that is set, as in ray.init
    code, log = _cli("generate.py", *args, env={"RAY_ADDRESS": f"127.0.0.1:{port}"}, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert f"cannot reach the Ray cluster at RAY_ADDRESS='127.0.0.1:{port}' (cluster.address='auto')" in log
    assert "Traceback" not in log


def test_a_dashboard_address_for_the_ray_cluster_exits_2_saying_which_address_a_driver_needs(tmp_path):
    """docs/cluster.md has users `export RAY_ADDRESS=http://127.0.0.1:8265` for `ray job submit`; a job then
    started from that shell with cluster=ray died in ray.init with a traceback."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    args = [f"output.uri={tmp_path / 'out'}", f"data.path={data}", "cluster=ray"]
    code, log = _cli("generate.py", *args, env={"RAY_ADDRESS": "http://user:pw@127.0.0.1:8265"}, cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert "RAY_ADDRESS='http://***@127.0.0.1:8265' (cluster.address='auto')" in log
    assert "Unset RAY_ADDRESS" in log and "Traceback" not in log and "pw@" not in log
    code, log = _cli("generate.py", *args, "cluster.address=https://head:8265", cwd=tmp_path)
    assert code == 2, log[-2000:]
    assert "cluster.address='https://head:8265' is a dashboard / Jobs API address" in log
