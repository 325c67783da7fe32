"""The training loop: bitwise reproducible steps, the LR schedule, and a checkpoint the normal loader reads."""

import json

import pytest
import torch

from pipeline.models.tiny import build_tokenizer
from pipeline.training.config import TrainConfig, check_train
from pipeline.training.data import train_batches
from pipeline.training.loop import build_model, lr_at, make_optimizer, train, train_steps

# A smaller member of the same architecture, so that the loop tests take seconds.
MICRO = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "head_dim": 16,
    "global_head_dim": 32,
    "moe_intermediate_size": 32,
}


def _run(cfg: TrainConfig, tokenizer, steps: int):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg)
    batches = train_batches(
        tokenizer, seed=cfg.seed, mix=cfg.mix, batch_size=cfg.batch_size, canvas_length=32
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = train_steps(model, optimizer, batches, cfg, generator, start=0, stop=steps)
    return model, [loss for loss, _ in losses]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_steps_are_bitwise_reproducible(tokenizer):
    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(seed=3, threads=1, batch_size=8, warmup_steps=1, text_overrides=MICRO)
        model_a, losses_a = _run(cfg, tokenizer, 3)
        model_b, losses_b = _run(cfg, tokenizer, 3)
        model_c, losses_c = _run(TrainConfig(**{**vars(cfg), "seed": 4}), tokenizer, 3)
    finally:
        torch.set_num_threads(threads)
    assert losses_a == losses_b
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert losses_c != losses_a
    # the steps did train: the weights moved
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    torch.manual_seed(3)
    fresh = build_model(cfg).state_dict()
    assert not torch.equal(fresh[key], model_a.state_dict()[key])


def test_vision_tower_is_not_trained(tokenizer):
    cfg = TrainConfig(batch_size=4, text_overrides=MICRO)
    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in trained) == ("vision" not in name), name


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_config_checks_name_the_key():
    from pipeline.config.schema import ConfigError

    with pytest.raises(ConfigError, match="train.noise_floor=1.0"):
        check_train(TrainConfig(noise_floor=1.0))
    with pytest.raises(ConfigError, match="train.steps=0"):
        check_train(TrainConfig(steps=0))


def test_train_writes_a_checkpoint_the_loader_reads(tmp_path):
    from pipeline.models.loader import load_model

    out = tmp_path / "tiny"
    cfg = TrainConfig(
        steps=2,
        batch_size=4,
        warmup_steps=1,
        log_every=1,
        eval_every=0,
        eval_rows_per_task=2,
        text_overrides=MICRO,
        out_dir=str(out),
        threads=torch.get_num_threads(),
    )
    result = train(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_log.json",
    ]
    assert not (tmp_path / "tiny.partial").exists()
    assert result.steps == 2 and len(result.curve) == 1 and set(result.curve[0]) >= {"addition", "all"}
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["seed"] == 0 and len(log["losses"]) == 2
    loaded = load_model(str(out), device="cpu")
    assert loaded.info.canvas_length == 32
    assert loaded.info.generation_config["max_new_tokens"] == 32
    assert loaded.info.generation_config["entropy_bound"] == 0.1
    assert loaded.model.hidden_size == 64


def test_unit_qk_norm_init_gives_unit_variance_attention_logits():
    torch.manual_seed(0)
    model = build_model(TrainConfig())
    attn = model.model.decoder.layers[0].self_attn
    assert torch.allclose(attn.q_norm.weight, torch.full_like(attn.q_norm.weight, attn.head_dim**-0.25))
    encoder_attn = model.model.encoder.language_model.layers[0].self_attn
    assert encoder_attn.k_norm.weight is attn.k_norm.weight  # tied: one init serves both
    x = torch.randn(256, model.config.text_config.hidden_size)
    q = attn.q_norm(attn.q_proj(x).view(256, -1, attn.head_dim))[:, 0]
    k = attn.k_norm(attn.k_proj(x).view(256, -1, attn.head_dim))[:, 0]
    assert 0.7 < (q @ k.T).std() < 1.4
    torch.manual_seed(0)
    reference = build_model(TrainConfig(qk_norm_init="reference")).model.decoder.layers[0].self_attn
    assert torch.equal(reference.q_norm.weight, torch.ones_like(reference.q_norm.weight))


def test_train_refuses_an_out_dir_that_is_not_a_checkpoint(tmp_path):
    from pipeline.config.schema import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    cfg = TrainConfig(steps=1, batch_size=2, eval_every=0, text_overrides=MICRO, out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        train(cfg)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # it replaced the whole directory
    assert not (tmp_path.parent / (tmp_path.name + ".partial")).exists()


def test_logs_and_evaluations_keep_their_own_periods(tmp_path):
    # periods that do not divide each other: each is still kept (a log at 2, 4, 6 and an evaluation at 3, 6)
    cfg = TrainConfig(
        steps=6,
        batch_size=2,
        warmup_steps=1,
        log_every=2,
        eval_every=3,
        eval_rows_per_task=1,
        text_overrides=MICRO,
        out_dir=str(tmp_path / "tiny"),
        threads=torch.get_num_threads(),
    )
    result = train(cfg)
    assert [w["step"] for w in result.losses] == [2, 4, 6]
    assert [c["step"] for c in result.curve] == [3, 6]
