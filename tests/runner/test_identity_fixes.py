"""Model identity covers what changes outputs: weight content (not only sizes), tokenizer files and the chat
template, for local and s3:// models. A changed model gives a new derived run id, and is refused under an
explicit run.id (instead of "already complete")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config.schema import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
)
from pipeline.io.commit import RunConflictError
from pipeline.models.loader import resolve_model_dir
from pipeline.runner.identity import SAMPLE_BLOCKS, SAMPLE_BYTES, weight_fingerprint
from pipeline.runner.job import prepare, run


def _copy_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("builtin:tiny-diffusiongemma"), model)
    return model


def _halve_weights(path: Path) -> None:
    """Same tensors, names, dtypes and file size; every value halved (a different checkpoint)."""
    from safetensors.torch import load_file, save_file

    size = path.stat().st_size
    tensors = {k: (v * 0.5).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == size


def _job(tmp_path: Path, model: str, **run) -> JobConfig:
    data = tmp_path / "p.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}"}) + "\n" for i in range(3)))
    return JobConfig(
        model=ModelConfig(path=model),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(**run),
    )


def test_weight_tokenizer_and_template_changes_give_a_new_derived_run(tmp_path):
    model = _copy_model(tmp_path)
    first = prepare(_job(tmp_path, str(model)))
    again = prepare(_job(tmp_path, str(model)))
    assert again.run_id == first.run_id and again.status == "resume", "an unchanged model resumes its run"

    seen = {first.run_id}
    changes = {
        "weights x0.5, same size": lambda: _halve_weights(model / "model.safetensors"),
        "chat template": lambda: (model / "chat_template.jinja").write_text(
            (model / "chat_template.jinja").read_text() + "\n"
        ),
        "tokenizer.json": lambda: (model / "tokenizer.json").write_text(
            json.dumps(json.loads((model / "tokenizer.json").read_text()), indent=1)
        ),
        "tokenizer_config.json": lambda: (model / "tokenizer_config.json").write_text(
            json.dumps({**json.loads((model / "tokenizer_config.json").read_text()), "chat_template": "x"})
        ),
        "special_tokens_map.json added": lambda: (model / "special_tokens_map.json").write_text("{}"),
        "added_tokens.json added": lambda: (model / "added_tokens.json").write_text("{}"),
    }
    for what, change in changes.items():
        change()
        prep = prepare(_job(tmp_path, str(model)))
        assert prep.run_id not in seen, f"{what}: the run id must change"
        assert prep.status == "new", what
        seen.add(prep.run_id)


def test_a_changed_model_under_an_explicit_run_id_is_refused(tmp_path, caplog):
    model = _copy_model(tmp_path)
    assert prepare(_job(tmp_path, str(model), id="r1")).status == "new"
    _halve_weights(model / "model.safetensors")
    with pytest.raises(
        RunConflictError, match=r"\(the model's content \(its weights, config or tokenizer files\)\)"
    ):
        prepare(_job(tmp_path, str(model), id="r1"))
    assert run(_job(tmp_path, str(model), id="r1")) == 2  # refused at start-up, before any worker
    assert "run.id='r1'" in caplog.text and "different input or config" in caplog.text
    assert prepare(_job(tmp_path, str(model), id="r1", overwrite=True)).status == "new"


def test_weight_fingerprint_samples_a_huge_checkpoint_without_reading_it(tmp_path):
    """A 32 GiB (sparse) safetensors file: the fingerprint reads its header and 16 x 64 KiB, not the file."""
    path = tmp_path / "model-00001-of-00002.safetensors"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1 << 34], "data_offsets": [0, 1 << 35]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 35))

    def read_bytes() -> int:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(io["rchar"])

    before = read_bytes()
    base = weight_fingerprint(path)
    assert read_bytes() - before < 4 * SAMPLE_BLOCKS * SAMPLE_BYTES
    assert base["size"] == 8 + len(header) + (1 << 35) and base["sampled"]

    with open(path, "r+b") as f:  # a byte inside the last sampled block (the end of the file)
        f.seek(-100, 2)
        f.write(b"\x01")
    changed = weight_fingerprint(path)
    assert changed["sha256"] != base["sha256"]


@pytest.mark.s3
def test_s3_model_identity_follows_replaced_weights_and_tokenizer_files(tmp_path, s3_bucket):
    model = _copy_model(tmp_path)

    def upload(*names: str) -> None:
        for name in names:
            s3_bucket.put(f"models/m/{name}", (model / name).read_bytes())

    upload(*(p.name for p in model.iterdir()))
    uri = f"{s3_bucket.uri}/models/m"

    def s3_job() -> JobConfig:
        job = _job(tmp_path, uri)
        job.output.endpoint_url = s3_bucket.endpoint
        return job

    def fetched(prep) -> Path:  # what a worker of this run loads: the copy of the run's model version
        cache = str(tmp_path / "worker-cache")
        return Path(
            resolve_model_dir(
                uri, cache_dir=cache, endpoint_url=s3_bucket.endpoint, version=prep.spec.model_version
            )
        )

    first = prepare(s3_job())
    assert prepare(s3_job()).run_id == first.run_id
    assert first.spec.model_version
    old_copy = fetched(first)
    seen = {first.run_id}
    _halve_weights(model / "model.safetensors")  # replaced in place below: same key, same size
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    for name in ("model.safetensors", "chat_template.jinja"):
        upload(name)
        prep = prepare(s3_job())
        assert prep.run_id not in seen, f"replacing {name} on S3 must change the run id"
        seen.add(prep.run_id)
        copy = fetched(prep)  # not the cached copy of the old content
        assert copy != old_copy and (copy / name).read_bytes() == (model / name).read_bytes()
    assert (old_copy / "model.safetensors").read_bytes() != (model / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("model", "fingerprint"),
    [("builtin:tiny-llada", "ab4db0611969"), ("builtin:tiny-diffusiongemma-random", "858289d6950d")],
)
def test_settings_added_later_leave_the_identity_of_runs_that_do_not_use_them(tmp_path, model, fingerprint):
    """A run started before a setting existed resumes after it: the config fingerprints of these jobs are
    the ones they had before Dream's algorithm (new mask-sampler keys), completions_per_prompt,
    prompt_template and system_prompt were added. A new setting enters the fingerprint only when it is used
    (or changes outputs); update these values only for a change that changes outputs, and say so."""
    from pipeline.config.schema import SamplerConfig
    from pipeline.runner.plan import plan

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}+{i}"}) + "\n" for i in range(4)))
    job = JobConfig(
        model=ModelConfig(path=model),
        sampler=SamplerConfig(max_new_tokens=16),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=1),
        run=RunConfig(shard_size=2),
    )
    assert plan(job).identity["config_fingerprint"][:12] == fingerprint


def _fingerprint_and_id(tmp_path: Path, **settings) -> tuple[str, str]:
    """plan()'s config fingerprint and derived run id of a job with `settings` ({"group__key": value})."""
    from pipeline.runner.plan import plan

    data = tmp_path / "cols.jsonl"
    if not data.exists():
        rows = [
            {
                "prompt": f"Add: {i}+1",
                "question": f"{i}+2",
                "uid": f"u{i}",
                "messages": [{"role": "user", "content": "hi"}],
            }
            for i in range(3)
        ]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = _job(tmp_path, "builtin:tiny-diffusiongemma-random")
    job.data.path = str(data)
    for name, value in settings.items():
        group, key = name.split("__")
        if group == "postprocess":
            job.postprocess = value
        else:
            setattr(getattr(job, group), key, value)
    prep = plan(job)
    return prep.identity["config_fingerprint"], prep.run_id


def test_settings_that_change_outputs_change_the_config_fingerprint_and_others_keep_it(tmp_path):
    """Resume depends on the fingerprint: every setting that changes what a row holds must change it (else a
    changed job resumes the old run and mixes outputs), and engine, cluster, retry and progress settings must
    not (else a rerun on a bigger cluster starts over)."""
    base = _fingerprint_and_id(tmp_path)
    changes = {
        "model__dtype": "float32",
        "model__max_prompt_tokens": 64,
        "sampler__seed": 1,
        "sampler__stop": "x",
        "sampler__completions_per_prompt": 2,
        "data__prompt_column": "question",
        "data__messages_column": "messages",
        "data__id_column": "uid",
        "data__apply_chat_template": False,
        "data__prompt_template": "Add: {question}",
        "data__system_prompt": "Digits.",
        "postprocess__": {"_target_": "pipeline.tasks.checker.check_row"},
    }
    seen = {base[0]}
    for name, value in changes.items():
        fingerprint, _ = _fingerprint_and_id(tmp_path, **{name: value})
        assert fingerprint not in seen, f"{name}={value!r} changes outputs: the fingerprint must change"
        seen.add(fingerprint)
    check_row = {"_target_": "pipeline.tasks.checker.check_row"}
    assert _fingerprint_and_id(tmp_path, postprocess__={**check_row, "drop_incorrect": True})[0] not in seen
    same = {
        "cluster__num_workers": 4,
        "cluster__worker_start_timeout_s": 60.0,
        "run__progress_interval_s": 1.0,
        "run__shards_in_flight": 1,
        "run__max_shard_attempts": 5,
        "run__shard_timeout_s": None,
        "sampler__batch_size": 3,
        "sampler__batching": "static",
        "sampler__cuda_graphs": False,
        "output__compression": "snappy",
    }
    for name, value in same.items():
        assert _fingerprint_and_id(tmp_path, **{name: value}) == base, f"{name} changes no output"


def test_a_postprocess_secret_counts_by_name_not_value_in_the_config_fingerprint():
    """A literal or ${oc.env:...} API key in the postprocess kwargs was part of the config fingerprint: rotating
    the key gave a rerun another derived run id (every shard generated again), or refused an explicit run.id
    as another config; and a digest of the secret went into _run.json, the manifest and the card."""
    from pipeline.config.schema import JobConfig
    from pipeline.runner.identity import config_fingerprint

    def fingerprint(**kwargs) -> str:
        job = JobConfig()
        job.postprocess = {"_target_": "pipeline.tasks.checker.check", "drop_incorrect": True, **kwargs}
        return config_fingerprint(job, "model", {})

    assert fingerprint(api_key="sk-old") == fingerprint(api_key="sk-rotated") != fingerprint()
    assert fingerprint(api_key="sk-old", retries=2) != fingerprint(api_key="sk-old", retries=3)
    # a postprocess without secrets keeps the fingerprint (and run id) it had
    assert fingerprint() == "ac7a172df37268974934be92eb3b61ce330720755127b415369cfdc70be204c4"


def test_the_settings_recorded_in_the_run_file_hold_no_secret_under_any_key(tmp_path, monkeypatch):
    """_run.json records the fingerprinted settings resolved: a `${oc.env:...}` API key in a URL's query or in a
    list of headers (no secret-like key of its own) was written there as is, where _config.yaml writes the
    reference's text; so was a keyword argument's secret repeated in another value. Both are removed."""
    from omegaconf import OmegaConf

    from pipeline.config.store import to_job_config

    monkeypatch.setenv("SCORER_API_KEY", "CANARY-env-7d21c")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+1"}) + "\n")
    postprocess = {
        "_target_": "tests.runner.postprocess_fns.calls_an_api",
        "api_key": "CANARY-literal-3f9",
        "endpoint": "https://scorer.example/v1?key=${oc.env:SCORER_API_KEY}&k2=CANARY-literal-3f9",
        "headers": ["Authorization: Bearer ${oc.env:SCORER_API_KEY}"],
    }
    job = to_job_config(
        OmegaConf.merge(
            OmegaConf.structured(_job(tmp_path, "builtin:tiny-diffusiongemma-random")),
            {"postprocess": postprocess},
        )
    )
    assert prepare(job).status == "new"
    (run_file,) = (tmp_path / "out").glob("*/_run.json")
    recorded = run_file.read_text()
    assert "CANARY" not in recorded, recorded
    settings = json.loads(recorded)["config"]["postprocess"]
    assert settings["endpoint"] == "https://scorer.example/v1?key=<redacted>&k2=<redacted>"
    assert settings["headers"] == ["Authorization: Bearer <redacted>"] and settings["api_key"] == "<redacted>"
