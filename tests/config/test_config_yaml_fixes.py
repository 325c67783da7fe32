"""_config.yaml: `${oc.env:...}` interpolations are written as text (never the variable's value), values of
secret-like keys are redacted, the rest is resolved, and run.id records the run's actual id (derived, or a
nightly's from its date)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import JobConfig, register_configs, to_job_config
from pipeline.config.redact import REDACTED, config_yaml
from pipeline.runner.job import prepare

ROOT = Path(__file__).resolve().parents[2]
register_configs()
SECRET = "hf_s3cr3t_Zq81x"


def _job(script: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    """jobs/<script> run with `args` and `env` added to this environment: the process and its output."""
    shown = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    return shown, shown.stdout + shown.stderr


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse: word{i}"}) + "\n" for i in range(2)))
    return data


def test_config_yaml_writes_env_interpolations_as_text_and_redacts_secret_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("CANVASFLOW_TEST_TOKEN", SECRET)
    data = _prompts(tmp_path)
    overrides = [
        f"data.path={data}",
        f"output.uri={tmp_path / 'out'}",
        "+data.hf_kwargs.token=${oc.env:CANVASFLOW_TEST_TOKEN}",
        "+data.hf_kwargs.headers.authorization=Bearer ${oc.env:CANVASFLOW_TEST_TOKEN}",
        "+data.hf_kwargs.copy=${data.hf_kwargs.token}",  # an interpolation of an interpolation
        "+data.hf_kwargs.api_key=literal-key-987",
        "+data.hf_kwargs.aws_secret_access_key=literal-secret-654",
        "+data.hf_kwargs.use_auth_token=true",
        "+data.hf_kwargs.name=${data.prompt_column}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    job = to_job_config(cfg)
    assert job.data.hf_kwargs["token"] == SECRET, "the job itself gets the value"
    prep = prepare(job, resolved_yaml=config_yaml(cfg))

    text = (tmp_path / "out" / prep.run_id / "_config.yaml").read_text()
    for value in (SECRET, "literal-key-987", "literal-secret-654"):
        assert value not in text
    written = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    kwargs = written["data"]["hf_kwargs"]
    assert kwargs["token"] == "${oc.env:CANVASFLOW_TEST_TOKEN}"
    assert kwargs["headers"]["authorization"] == "Bearer ${oc.env:CANVASFLOW_TEST_TOKEN}"
    assert kwargs["copy"] == "${oc.env:CANVASFLOW_TEST_TOKEN}"
    assert kwargs["api_key"] == REDACTED and kwargs["aws_secret_access_key"] == REDACTED
    assert kwargs["use_auth_token"] is True and kwargs["name"] == "prompt", "the rest stays resolved"
    assert written["data"]["path"] == str(data) and written["sampler"]["max_new_tokens"] is None
    assert written["sampler"]["batch_size"] == 8
    assert written["run"]["id"] == prep.run_id, "the derived run id, not null"


def test_config_yaml_of_an_api_job_redacts_literal_secrets():
    job = JobConfig()
    job.data.hf_kwargs = {"token": SECRET, "revision": "main"}
    text = config_yaml(OmegaConf.to_container(OmegaConf.structured(job)))
    assert SECRET not in text
    kwargs = OmegaConf.create(text).data.hf_kwargs
    assert kwargs.token == REDACTED and kwargs.revision == "main"
    assert OmegaConf.create(text).sampler.max_new_tokens is None  # "max_new_tokens" is not secret-like


@pytest.mark.ray
def test_nightly_config_yaml_records_the_night_run_id_and_no_secret(tmp_path):
    data = _prompts(tmp_path)
    out = tmp_path / "nightly"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "nightly.py"),
            f"output.uri={out}",
            f"data.path={data}",
            "nightly.date=2026-01-05",
            "model.path=builtin:tiny-diffusiongemma-random",
            "sampler.max_denoising_steps=2",
            "sampler.max_new_tokens=8",
            "cluster.num_workers=1",
            "+data.hf_kwargs.token=${oc.env:CANVASFLOW_TEST_TOKEN}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "CANVASFLOW_TEST_TOKEN": SECRET},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    run_dir = out / "nightly-2026-01-05"
    written = OmegaConf.create((run_dir / "_config.yaml").read_text())
    assert written.run.id == "nightly-2026-01-05"
    assert written.nightly.date == "2026-01-05"
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in ("", ".json", ".yaml", ".md"):
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in log


def test_config_yaml_redacts_fsspec_storage_option_credentials():
    """s3fs/fsspec take S3 credentials as storage_options {key, secret, token}: the access key id under `key`
    was written to _config.yaml as it is."""
    job = JobConfig()
    job.data.hf_kwargs = {"storage_options": {"key": "AKIAEXAMPLE12345", "secret": SECRET, "anon": False}}
    text = config_yaml(OmegaConf.to_container(OmegaConf.structured(job)))
    assert "AKIAEXAMPLE12345" not in text and SECRET not in text
    options = OmegaConf.create(text).data.hf_kwargs.storage_options
    assert options.key == REDACTED and options.secret == REDACTED and options.anon is False


def test_config_yaml_redacts_camel_case_auth_keys_and_passwords_in_urls():
    """accessKeyId, authorization, a webhook URL with user:password@, ... were written to _config.yaml as
    given (the keys were split at '_' only, and URL values were not looked at). Dashed keys and the items of
    lists are redacted too."""
    job = JobConfig()
    job.postprocess = {
        "_target_": "tests.support.crashers.crash_on",
        "authorization": "Bearer sk-live-SECRETAUTH",
        "webhook_url": "https://bot:SECRETPW@hooks.example.com/x",
        "pat": "ghp_SECRETPAT",
        "accessKeyId": "SECRETAKID",
        "secretAccessKey": "SECRETSAK",
        "clientSecret": "SECRETCS",
        "connection_string": "SECRETCONN",
        "conn-str": "SECRETDASHED",  # '-' is a word break as '_' is
        "mirrors": [{"token": "SECRETINLIST"}, "https://u:SECRETLISTPW@m.example.com"],  # lists are walked
        "headers": {"Authorization": "Bearer ${oc.env:CANVASFLOW_TEST_TOKEN}", "Cookie": "SECRETCOOKIE"},
        "author": "kept",
        "max_new_tokens_hint": 7,
    }
    text = config_yaml(OmegaConf.to_container(OmegaConf.structured(job)))
    assert "SECRET" not in text
    written = OmegaConf.to_container(OmegaConf.create(text), resolve=False)["postprocess"]
    assert written["webhook_url"] == "https://***@hooks.example.com/x"
    assert written["accessKeyId"] == REDACTED and written["headers"]["Cookie"] == REDACTED
    assert written["headers"]["Authorization"] == "Bearer ${oc.env:CANVASFLOW_TEST_TOKEN}", (
        "a reference stays"
    )
    assert written["author"] == "kept" and written["max_new_tokens_hint"] == 7
    assert written["mirrors"] == [{"token": REDACTED}, "https://***@m.example.com"]


def test_config_yaml_redacts_the_literal_default_of_an_env_reference_under_a_secret_key(monkeypatch):
    """`token: ${oc.env:HF_TOKEN,hf_...}` names a variable and a literal fallback token: the reference stays
    as text, and the fallback (a secret given in the config) is redacted; a null default is kept."""
    monkeypatch.delenv("CANVASFLOW_UNSET_TOKEN", raising=False)
    job = JobConfig()
    job.data.hf_kwargs = {
        "token": "${oc.env:CANVASFLOW_UNSET_TOKEN," + SECRET + "}",
        "headers": {"Authorization": "Bearer ${oc.env:CANVASFLOW_UNSET_TOKEN,'" + SECRET + "'}"},
        "api_key": "${oc.env:CANVASFLOW_UNSET_TOKEN,null}",
        "cache_dir": "${oc.env:CANVASFLOW_UNSET_DIR,/tmp/cache}",  # not secret-like: kept
    }
    text = config_yaml(OmegaConf.to_container(OmegaConf.structured(job)))
    assert SECRET not in text
    kwargs = OmegaConf.to_container(OmegaConf.create(text), resolve=False)["data"]["hf_kwargs"]
    assert kwargs["token"].startswith("${oc.env:CANVASFLOW_UNSET_TOKEN,")
    assert kwargs["headers"]["Authorization"].startswith("Bearer ${oc.env:CANVASFLOW_UNSET_TOKEN,")
    assert kwargs["api_key"] == "${oc.env:CANVASFLOW_UNSET_TOKEN,null}"
    assert kwargs["cache_dir"] == "${oc.env:CANVASFLOW_UNSET_DIR,/tmp/cache}"
    assert OmegaConf.create(text).data.hf_kwargs.token == REDACTED, "the file still resolves"


@pytest.mark.parametrize(
    ("script", "args", "code"),
    [
        ("generate.py", ["--cfg", "job"], 0),
        ("nightly.py", ["--help"], 0),
        ("generate.py", ["postprocess.api_key=CANARY-key1"], 2),  # no '+': Hydra echoes the override to fix
        ("generate.py", ["+postprocess.password=pa#CANARY-pw2"], 2),  # not parsed: Hydra echoes the override
    ],
)
def test_what_hydra_prints_before_the_job_starts_redacts_secret_keys(script, args, code):
    """`--cfg job`, `--help` and Hydra's compose errors printed the values of token/password/key-like keys,
    which _config.yaml redacts: "To append to your config use +postprocess.api_key=<the key>"."""
    overrides = [
        "postprocess=callable",
        "postprocess._target_=pipeline.tasks.checker.check_row",
        "+postprocess.api_key=CANARY-key1",
        "'+data.hf_kwargs.storage_options={key: CANARY-key3, secret: CANARY-secret4}'",
        "+data.hf_kwargs.token=${oc.env:HF_TOKEN}",
    ]
    if code:
        overrides = [o for o in overrides if "api_key" not in o]
    shown, output = _job(script, [*args, *[o.strip("'") for o in overrides]], {"HF_TOKEN": "CANARY-env5"})
    assert shown.returncode == code, output
    assert "CANARY" not in output
    assert REDACTED in output
    if args == ["--cfg", "job"]:
        assert (
            "token: ${oc.env:HF_TOKEN}" in output and "_target_: pipeline.tasks.checker.check_row" in output
        )
    if args == ["--help"]:  # the usage line's placeholder is no secret
        assert "python jobs/nightly.py [group=option ...] [key=value ...]" in output, output


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        # No '+': ConfigCompositionException. Not parsed: OverrideParseException.
        ("postprocess.api_key=CANARY-full1", "+postprocess.api_key=<redacted>"),
        ("+postprocess.password=pa#CANARY-full2", "+postprocess.password=<redacted>"),
    ],
)
def test_hydra_full_error_tracebacks_of_compose_errors_are_redacted(override, shown):
    """With HYDRA_FULL_ERROR=1 Hydra raises its compose error instead of exiting 1: the interpreter printed the
    traceback after run_cli had restored the streams, "To append to your config use
    +postprocess.api_key=CANARY" with it, and the job exited 1."""
    overrides = ["postprocess=callable", "postprocess._target_=pipeline.tasks.checker.check_row", override]
    shown_run, output = _job("generate.py", [*overrides], {"HYDRA_FULL_ERROR": "1"})
    assert shown_run.returncode == 2, output
    assert "CANARY" not in output
    assert "Traceback (most recent call last)" in output and shown in output, output
    assert "could not start (exit code 2): the configuration did not compose" in output


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--cfg", "all"], ["--info", "config"], ["--help"]])
def test_nested_and_multi_word_secret_values_are_redacted_before_the_job_starts(args):
    """`--cfg job` showed the value of a secret-like key that YAML writes over several lines (a list, a mapping)
    or with spaces ("Authorization: Bearer CANARY"), `--cfg all` the overrides holding them ("+postprocess.
    api_key=[CANARY, ...]", "auth={user: u, pass: CANARY}"), also where a long one is folded onto the next line
    (hydra.job.override_dirname)."""
    overrides = [
        "postprocess=callable",
        "postprocess._target_=pipeline.tasks.checker.check_row",
        "+postprocess.headers={Authorization: 'Bearer CANARY-n1 x', Accept: text/plain}",
        "+postprocess.api_key=[CANARY-n2, CANARY-n3]",
        "+postprocess.auth={user: u, pass: CANARY-n4}",
        '+postprocess.token="multi word CANARY-n5"',
        "+data.hf_kwargs.storage_options={client_kwargs: {region_name: eu-west-1, endpoint_url: "
        "http://127.0.0.1:8333, aws_secret_access_key: CANARY-n6}}",
        "+postprocess.credentials={profile: [CANARY-n7]}",
        "+postprocess.hf_token=${oc.env:HF_TOKEN}",
    ]
    shown, output = _job("generate.py", [*args, *overrides], {"HF_TOKEN": "CANARY-env8"})
    assert shown.returncode == 0, output
    assert "CANARY" not in output, output
    for kept in ("Accept: text/plain", "region_name: eu-west-1", "hf_token: ${oc.env:HF_TOKEN}"):
        assert kept in output, kept
    if args == ["--cfg", "all"]:  # the logger botocore.credentials is no secret
        assert "botocore.credentials:\n        level: WARNING" in output, output
    assert "Authorization: <redacted>" in output and "api_key: <redacted>" in output


@pytest.mark.parametrize(
    "override",
    [
        'postprocess.token="pre\\" CANARY-q1"',  # an escaped quote ended the value redacted
        "postprocess.token='it\\'s CANARY-q2'",
        "postprocess.headers={X-Api-Key:CANARY-q3,Accept:text/plain}",  # `key:value`, no space, in {...}
        "postprocess.x=[{secret:CANARY-q4}]",
    ],
)
def test_compose_errors_redact_escaped_quotes_and_flow_keys_without_a_space(override):
    """Hydra's "To append to your config use +postprocess.token=..." showed the text after an escaped quote
    (`<redacted> CANARY"`) and the value of `{X-Api-Key:CANARY}`, which Hydra's syntax allows without a space."""
    overrides = ["postprocess=callable", "postprocess._target_=pipeline.tasks.checker.check_row", override]
    shown, output = _job("generate.py", overrides, {})
    assert shown.returncode == 2, output
    assert "CANARY" not in output and "To append to your config use +postprocess." in output, output
    assert REDACTED in output


def test_output_before_the_job_starts_is_redacted_whole_not_write_by_write(capsys):
    """print("api_key:", value) is two writes (and writelines one per line): each was redacted on its own, so
    the key and its value were never seen together and the value was printed. Held text is released at
    flush(), when the task starts, and when run_cli returns."""
    from pipeline.config.store import run_cli

    started = False

    def main():
        nonlocal started
        print("api_key:", "CANARY-w1")
        sys.stderr.writelines(["--token=", "CANARY-w2\n"])
        sys.stderr.flush()
        print("password=", end="", file=sys.stderr)
        started = True
        print("the job's own output")

    run_cli(main, lambda: started, "jobs/generate.py")
    out, err = capsys.readouterr()
    assert out == f"api_key: {REDACTED}\nthe job's own output\n"
    assert err == f"--token={REDACTED}\npassword=", "held text is released (a key without a value is kept)"
