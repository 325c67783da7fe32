"""Dream: a checkpoint in the published layout (model_type "Dream", Qwen2 names, q/k/v biases) loads through
`load_model`, and the native forward with the one-position logit shift equals the reference's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.models.loader import ModelError, inspect_model, load_model
from tests.support.mask_models import ReferenceModel, build_mask_checkpoint, with_distinct_norms


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return build_mask_checkpoint(tmp_path_factory.mktemp("dream") / "m", family="dream", std=0.1)


def test_published_layout_loads_through_the_normal_path(dream_dir):
    config = json.loads((dream_dir / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    with safe_open(str(dream_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.1.self_attn.v_proj.bias",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    ):
        assert name in names, name
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    loaded = load_model(str(dream_dir), device="cpu")
    assert loaded.info.family == "dream" and loaded.model.spec.shift_logits
    assert loaded.info.mask_token_id == loaded.tokenizer.mask_token_id == config["mask_token_id"]
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sort: 3 1 2"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nSort: 3 1 2<|im_end|>\n<|im_start|>assistant\n"


def test_shifted_logits_match_the_reference(dream_dir):
    """The reference shifts its logits right by one; canvasflow reads position p's prediction from the hidden
    state at p - 1 (per-row positions, no padding)."""
    model = load_model(str(dream_dir), device="cpu").model
    gen = torch.Generator().manual_seed(0)
    lengths = [6, 17, 11]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    attention = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, model.vocab_size, (n,), generator=gen)
        attention[row, width - n :] = 1
    expected = ReferenceModel(dream_dir)(ids, attention)
    for row, n in enumerate(lengths):
        tokens = ids[row, width - n :][None]
        hidden = model(tokens, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
        logits = model.logits(hidden)[0]  # [n, V]: logits[p - 1] predicts position p
        want = expected[row, width - n :].float()
        torch.testing.assert_close(logits[:-1], want[1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu"), ("use_sliding_window", True)])
def test_unsupported_configs_are_refused_naming_the_key(dream_dir, tmp_path, key, value):
    config = json.loads((dream_dir / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=key):
        inspect_model(str(tmp_path))


def test_every_norm_is_read_from_its_published_name(dream_dir, tmp_path):
    """The tiny checkpoint's norms are all ones, under which a swapped norm name (input_layernorm read as the
    MLP's) computes the same function: with distinct norms, the logits must still be the reference's."""
    model_dir = with_distinct_norms(dream_dir, tmp_path / "m")
    gen = torch.Generator().manual_seed(1)
    model = load_model(str(model_dir), device="cpu").model
    ids = torch.randint(3, model.vocab_size, (1, 9), generator=gen)
    expected = ReferenceModel(model_dir)(ids, torch.ones_like(ids))[0].float()
    logits = model.logits(model(ids, torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool)))[0]
    torch.testing.assert_close(logits[:-1], expected[1:], atol=1e-4, rtol=1e-4)
