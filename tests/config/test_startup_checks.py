"""What used to fail only once the cluster had started (or never) fails at start-up, exit code 2, naming what to
fix: workers asking for GPUs this machine does not have, a model whose weights are missing or cut short, and a
local Ray instance that cannot start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config.schema import (
    ClusterConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
)
from pipeline.models.loader import ModelError, resolve_model_dir
from pipeline.models.weights import read_header
from pipeline.runner.plan import plan

ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, **model) -> JobConfig:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add: {i}+1"}) + "\n" for i in range(5)))
    return JobConfig(
        model=ModelConfig(**model),
        data=DataConfig(path=str(data)),
        output=OutputConfig(uri=str(tmp_path / "out")),
        cluster=ClusterConfig(num_workers=2),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_workers_asking_for_gpus_this_machine_lacks_are_refused(tmp_path):
    """cluster.num_gpus_per_worker=1 on a machine without GPUs (cluster.mode=local) passed the dry run, then
    waited cluster.worker_start_timeout_s (10 minutes) for a node that fits, logging Ray's autoscaler errors."""
    job = _job(tmp_path)
    job.cluster.num_gpus_per_worker = 1
    with pytest.raises(ConfigError) as error:
        plan(job)
    assert str(error.value).startswith(
        "cluster.num_gpus_per_worker=1 for 1 worker(s), but this machine has 0 CUDA device(s), room for 0 such "
        "worker(s) (cluster.mode=local runs the workers here)"
    )  # 5 rows: one shard, so one worker
    job.cluster.num_gpus_per_worker = 0
    plan(job)


def _model_copy(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("builtin:tiny-diffusiongemma"), model)
    return model


def _cut(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return f"{weights} is not a readable safetensors file ("


def _cut_in_the_data(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a download cut short: the header is whole
    return "bytes of data; the file has"


def _sharded(model: Path) -> str:
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"},
    }
    (model / "model.safetensors").rename(model / "model-00002-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{model / 'model-00001-of-00002.safetensors'}, named by {model / 'model.safetensors.index.json'}"


def _cut_by_one_byte(model: Path) -> str:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # the smallest cut: the data's end is counted exactly
    return "bytes of data; the file has"


def _last_shard_cut(model: Path) -> str:
    """Every shard is checked, not only the first."""
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").unlink()
    (model / "model-00001-of-00002.safetensors").write_bytes(data)
    (model / "model-00002-of-00002.safetensors").write_bytes(data[:-100])
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{model / 'model-00002-of-00002.safetensors'} is not a readable safetensors file"


@pytest.mark.parametrize(
    "damage",
    [
        lambda model: (model / "model.safetensors").unlink() or f"{model} has neither model.safetensors nor",
        _cut,
        _cut_in_the_data,
        _sharded,
        _cut_by_one_byte,
        _last_shard_cut,
    ],
    ids=[
        "missing",
        "cut-in-the-header",
        "cut-in-the-data",
        "index-names-a-missing-shard",
        "cut-by-one-byte",
        "last-shard-cut",
    ],
)
def test_a_model_whose_weights_are_missing_or_cut_short_is_refused(tmp_path, damage):
    """It passed the dry run, then every worker failed to load it once Ray had started (on a GPU cluster: once
    the GPU nodes were up)."""
    model = _model_copy(tmp_path)
    problem = damage(model)
    with pytest.raises(ModelError) as error:
        plan(_job(tmp_path, path=str(model)))
    assert str(error.value).startswith(f"model.path={str(model)!r}: ") and problem in str(error.value)


@pytest.mark.s3
def test_an_s3_model_whose_weights_are_not_all_there_is_refused(tmp_path, s3_bucket):
    source = Path(resolve_model_dir("builtin:tiny-diffusiongemma"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).exists():
            s3_bucket.put(f"m/{name}", (source / name).read_bytes())
    job = _job(tmp_path, path=f"{s3_bucket.uri}/m")
    job.output.endpoint_url = s3_bucket.endpoint
    with pytest.raises(
        ModelError, match=r"/m' has neither model.safetensors nor model.safetensors.index.json"
    ):
        plan(job)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    s3_bucket.put("m/model.safetensors.index.json", json.dumps(index).encode())
    s3_bucket.put("m/model-00002-of-00002.safetensors", (source / "model.safetensors").read_bytes())
    with pytest.raises(
        ModelError, match=r"names 1 weight file\(s\) that are not there: model-00001-of-00002"
    ):
        plan(job)
    # Each file's header is read by ranged GETs, so an upload cut short fails here, before any node downloads it.
    s3_bucket.put("m/model-00001-of-00002.safetensors", (source / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ModelError) as error:
        plan(job)
    assert str(error.value).startswith(
        f"{s3_bucket.uri}/m/model-00001-of-00002.safetensors is not a readable safetensors file (its tensors need "
    ) and str(error.value).endswith("it was cut short): upload it again")
    s3_bucket.put("m/model-00001-of-00002.safetensors", (source / "model.safetensors").read_bytes())
    plan(job)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    s3_bucket.put("m/config.json", json.dumps(config).encode())
    plan(job)
    job.run.dry_run = True  # the shapes against config.json: a dry run's check
    with pytest.raises(ModelError, match=r"/m': 15 tensor\(s\) do not have the shape config.json implies \("):
        plan(job)


def _edit_config(**changes):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (config.get("text_config") or config).update(changes)
        (model / "config.json").write_text(json.dumps(config))

    return edit


def _drop_layer_1_norms(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.decoder.layers.1.") and "layernorm" in n]:
        del tensors[name]
    save_file(tensors, model / "model.safetensors")


@pytest.mark.parametrize(
    ("builtin", "damage", "problem"),
    [
        (
            "builtin:tiny-diffusiongemma",
            _edit_config(hidden_size=64),
            "77 tensor(s) do not have the shape config.json implies (model.decoder.embed_tokens.weight is "
            "[128, 128], not [128, 64], ",
        ),
        (
            "builtin:tiny-diffusiongemma",
            _drop_layer_1_norms,
            "the checkpoint lacks 7 tensor(s) that config.json implies: model.decoder.layers.1.input_layernorm.weight, ",
        ),
        (
            "builtin:tiny-llada",
            _edit_config(mlp_hidden_size=256),
            "12 tensor(s) do not have the shape config.json implies (model.transformer.blocks.0.ff_out.weight is "
            "[128, 384], not [128, 256]",
        ),
    ],
    ids=["diffusiongemma-hidden-size", "diffusiongemma-missing-tensors", "llada-mlp-size"],
)
def test_a_dry_run_refuses_weights_of_another_model_than_the_config(tmp_path, builtin, damage, problem):
    """Weights whose shapes config.json does not imply (a config of another size of the model, a hand edit)
    passed the dry run, then every worker failed to load them once the cluster had started. The dry run builds
    the model on the meta device (torch, which a real run's driver does not import) and compares the headers'
    shapes; a real run leaves the comparison to the workers."""
    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir(builtin), model)
    damage(model)
    job = _job(tmp_path, path=str(model))
    plan(job)
    job.run.dry_run = True
    with pytest.raises(ModelError) as error:
        plan(job)
    assert str(error.value).startswith(f"model.path={str(model)!r}: {problem}"), str(error.value)


def test_a_header_over_the_safetensors_limit_is_not_read():
    """A file whose first 8 bytes are not a safetensors header length (a pickled checkpoint renamed) could
    claim a header of gigabytes, all read into memory before its JSON failed to parse."""
    reads = []

    def read(offset, length):
        reads.append((offset, length))
        return (2**31).to_bytes(8, "little") if offset == 0 else b"{}"

    with pytest.raises(ValueError, match="its header claims 2147483648 bytes, over safetensors' limit"):
        read_header(read, 2**33)
    assert reads == [(0, 8)]


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, "its header lists tensors without a shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "lists tensors without byte offsets"),
        ({"w": "F32"}, "its header lists tensors without byte offsets"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "lists tensors without a shape"),
    ],
    ids=["no-shape", "one-offset", "entry-not-an-object", "negative-dimension"],
)
def test_a_header_whose_tensors_lack_a_shape_or_offsets_is_refused(header, problem):
    data = json.dumps(header).encode()
    blob = len(data).to_bytes(8, "little") + data + bytes(4)
    with pytest.raises(ValueError, match=problem):
        read_header(lambda offset, length: blob[offset : offset + length], len(blob))


def test_a_local_ray_instance_that_cannot_start_exits_2_naming_its_folder(tmp_path):
    """Ray's session folder lives under TMPDIR (RAY_TMPDIR), which Ray takes as set: one it cannot use ended the
    job in a Hydra traceback with exit code 1 ("shards failed")."""
    not_a_folder = tmp_path / "tmp"
    not_a_folder.write_text("")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "generate.py"),
            f"data.path={data}",
            f"output.uri={tmp_path / 'out'}",
        ],
        env={**os.environ, "TMPDIR": str(not_a_folder)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert "could not start a local Ray instance: NotADirectoryError" in log and "Traceback" not in log
    assert f"Ray writes its session files under {not_a_folder}/ray: check that this folder is writable" in log


def test_the_driver_checks_the_weights_without_importing_torch():
    """The weight check's safetensors.safe_open imported torch into the driver: 2 s and 140 MB more for every
    job, which runs no model there."""
    code = "import sys, pipeline.runner.job, pipeline.runner.nightly, pipeline.runner.status; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr
