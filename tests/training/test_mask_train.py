"""The tiny LLaDA training job writes a checkpoint that the normal loader and the mask sampler use."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import ConfigError
from pipeline.models.loader import load_model
from pipeline.training.mask_train import MaskModelShape, MaskTrainConfig, check_mask_train, train


def short_run(out_dir, **overrides) -> MaskTrainConfig:
    shape = MaskModelShape(hidden_size=32, intermediate_size=64, num_layers=1)
    return MaskTrainConfig(
        steps=3,
        batch_size=4,
        warmup_steps=1,
        shape=shape,
        eval_rows_per_task=2,
        out_dir=str(out_dir),
        **overrides,
    )


def test_a_short_run_writes_a_loadable_llada_checkpoint(tmp_path):
    path = train(short_run(tmp_path / "tiny-llada"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["d_model"] == 32
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["max_new_tokens"], generation["block_length"]) == (16, 8)
    loaded = load_model(str(path), device="cpu")
    assert loaded.info.family == "llada" and loaded.model.spec.num_layers == 1
    log = json.loads((path / "training_log.json").read_text())
    assert log["config"]["steps"] == 3 and log["steps_done"] == 3
    assert [entry["step"] for entry in log["losses"]] == [0, 2]  # every log_every steps and the last
    assert set(log["heldout_exact_path"]) >= {"addition", "sort", "all"}


def test_bad_values_name_the_key():
    with pytest.raises(
        ConfigError, match="train.answer_length=20 must be a multiple of train.block_length=8"
    ):
        check_mask_train(MaskTrainConfig(answer_length=20))


def test_the_checkpoint_replaces_out_dir_only_once_whole(tmp_path, monkeypatch):
    """The job wrote into train.out_dir as it went: a run stopped part way left the earlier checkpoint with a
    new tokenizer beside its old weights, and any directory given (train.out_dir=/tmp) got its files."""
    out = tmp_path / "tiny-llada"
    train(short_run(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the held-out evaluation, after the weights were written

    monkeypatch.setattr("pipeline.training.mask_train.evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(short_run(out, seed=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier checkpoint is whole"
    monkeypatch.undo()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="train.out_dir=.*mine.* is not a checkpoint of this job"):
        train(short_run(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
