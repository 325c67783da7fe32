"""The tiny LLaDA training job writes a checkpoint that the normal loader and the mask sampler use."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import ConfigError
from pipeline.models.loader import load_model
from pipeline.training.mask_train import MaskModelShape, MaskTrainConfig, check_mask_train, train


def test_a_short_run_writes_a_loadable_llada_checkpoint(tmp_path):
    cfg = MaskTrainConfig(
        steps=3,
        batch_size=4,
        warmup_steps=1,
        shape=MaskModelShape(hidden_size=32, intermediate_size=64, num_layers=1),
        eval_rows_per_task=2,
        out_dir=str(tmp_path / "tiny-llada"),
    )
    path = train(cfg)
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
