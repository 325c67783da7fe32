"""LLaDA: a checkpoint in the published layout loads through `load_model` (no remote code), and the native
forward computes the architecture's function (checked against tests/support/mask_models.ReferenceModel, a
float64 forward written from the description over a left-padded batch)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.models.bidirectional import BidirectionalLM
from pipeline.models.loader import ModelError, inspect_model, load_model
from tests.support.mask_models import ReferenceModel, build_mask_checkpoint, with_distinct_norms

FP32 = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    return build_mask_checkpoint(tmp_path_factory.mktemp("llada") / "m", family="llada", std=0.1)


def _left_padded(lengths: list[int], vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        attention[row, width - n :] = 1
    return ids, attention


def _native_logits(model: BidirectionalLM, ids: torch.Tensor, attention: torch.Tensor) -> list[torch.Tensor]:
    """Per row: the unpadded tokens at positions 0..n-1 (canvasflow's per-row positions), batched right-padded."""
    rows = [ids[r][attention[r].bool()] for r in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        tokens[r, : len(row)], valid[r, : len(row)] = row, True
    positions = torch.arange(width).expand(len(rows), -1)
    logits = model.logits(model(tokens, positions, valid))
    return [logits[r, : len(row)] for r, row in enumerate(rows)]


def test_published_layout_loads_through_the_normal_path(llada_dir):
    config = json.loads((llada_dir / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    for key in (
        "d_model",
        "n_heads",
        "n_kv_heads",
        "n_layers",
        "mlp_hidden_size",
        "rope_theta",
        "rms_norm_eps",
    ):
        assert key in config
    with safe_open(str(llada_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    for name in (
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
        "model.transformer.blocks.1.q_proj.weight",
        "model.transformer.blocks.1.attn_out.weight",
        "model.transformer.blocks.1.ff_proj.weight",
        "model.transformer.blocks.1.up_proj.weight",
        "model.transformer.blocks.1.ff_out.weight",
        "model.transformer.blocks.1.attn_norm.weight",
        "model.transformer.blocks.1.ff_norm.weight",
    ):
        assert name in names, name
    loaded = load_model(str(llada_dir), device="cpu")
    assert loaded.info.family == "llada" and loaded.info.model_type == "llada"
    assert loaded.info.mask_token_id == config["mask_token_id"] == loaded.tokenizer.mask_token_id
    assert set(loaded.info.eos_token_ids) == {0, loaded.tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    assert isinstance(loaded.model, BidirectionalLM) and not loaded.model.spec.shift_logits
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add: 1+2"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("lengths", [[7, 19, 1, 12], [16]], ids=["left-padded", "one-row"])
def test_native_logits_match_the_reference(llada_dir, lengths):
    model = load_model(str(llada_dir), device="cpu").model
    ids, attention = _left_padded(lengths, model.vocab_size)
    expected = ReferenceModel(llada_dir)(ids, attention)
    for row, got in enumerate(_native_logits(model, ids, attention)):
        want = expected[row][attention[row].bool()].float()
        torch.testing.assert_close(got, want, **FP32)


def test_bf16_logits_stay_close(llada_dir):
    model = load_model(str(llada_dir), device="cpu", dtype="bfloat16").model
    assert model.dtype == torch.bfloat16
    ids, attention = _left_padded([5, 11], model.vocab_size)
    expected = ReferenceModel(llada_dir)(ids, attention)
    for row, got in enumerate(_native_logits(model, ids, attention)):
        torch.testing.assert_close(got, expected[row][attention[row].bool()].float(), atol=0.05, rtol=0.05)


def test_sharded_checkpoint_and_tied_head(llada_dir, tmp_path):
    """A sharded index loads to the same model; weight_tying (no ff_out tensor) uses the embedding."""
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = load_file(str(llada_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(sharded / file))
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((llada_dir / name).read_bytes())
    a, b = load_model(str(llada_dir), device="cpu").model, load_model(str(sharded), device="cpu").model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name

    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((llada_dir / "config.json").read_text())
    config["weight_tying"] = True
    (tied / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v for k, v in tensors.items() if k != "model.transformer.ff_out.weight"},
        str(tied / "model.safetensors"),
    )
    model = load_model(str(tied), device="cpu").model
    assert model.lm_head is None and model.head_weight is model.embed.weight
    ids, attention = _left_padded([9, 4], model.vocab_size)
    expected = ReferenceModel(tied)(ids, attention)
    for row, got in enumerate(_native_logits(model, ids, attention)):
        torch.testing.assert_close(got, expected[row][attention[row].bool()].float(), **FP32)


@pytest.mark.parametrize(
    "key, value", [("block_type", "sequential"), ("include_bias", True), ("scale_logits", True)]
)
def test_unsupported_configs_are_refused_naming_the_key(llada_dir, tmp_path, key, value):
    config = json.loads((llada_dir / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"{key}={value!r}"):
        inspect_model(str(tmp_path))


def test_missing_tensor_is_named(llada_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llada_dir / name).read_bytes())
    tensors = load_file(str(llada_dir / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="blocks.1.up_proj.weight"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("slots", [None, [2, 0]], ids=["prefix-slots", "scattered-slots"])
def test_cached_windows_equal_the_full_forward(llada_dir, slots, backend):
    """With the cache holding the keys/values of an unchanged sequence, recomputing a window (block + suffix:
    the prefix cache; the block alone: the dual cache) gives the full forward's hidden states there; also
    with the cached attention on the Triton kernel (grouped-query heads: 4 query, 2 key/value)."""
    model = load_model(str(llada_dir), device="cpu").model
    model.set_backend(backend)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([29, 21])
    tokens = torch.randint(3, model.vocab_size, (2, 32), generator=gen)
    positions = torch.arange(32).expand(2, -1)
    valid = positions < lengths[:, None]
    full = model(tokens, positions, valid)
    cache = model.new_cache(3, 40)
    slot_ids = None if slots is None else torch.tensor(slots)
    kw = dict(cache=cache, slots=slot_ids, key_length=lengths, key_span=32)
    torch.testing.assert_close(model(tokens, positions, valid, **kw), full, **FP32)  # fills the cache
    for lo, hi in ((8, 32), (8, 16)):
        window = torch.arange(lo, lo + 16).expand(2, -1)
        inside = (window < hi) & (window < lengths[:, None])
        got = model(tokens.gather(1, window), window, inside, **kw)
        for row in range(2):
            keep = inside[row]
            torch.testing.assert_close(got[row][keep], full[row][window[row][keep]], **FP32)


def test_a_pad_token_id_of_0_in_config_json_is_the_pad_not_eos(llada_dir, tmp_path):
    """config.json's pad_token_id=0 is a pad id like any other: only an absent one falls back to EOS."""
    model = tmp_path / "m"
    model.mkdir()
    for file in llada_dir.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "pad_token_id": 0, "eos_token_id": 5}))
    generation = model / "generation_config.json"
    if generation.exists():
        generation.write_text(
            json.dumps({k: v for k, v in json.loads(generation.read_text()).items() if "pad" not in k})
        )
    assert inspect_model(str(model)).pad_token_id == 0
    (model / "config.json").write_text(json.dumps({**config, "pad_token_id": None, "eos_token_id": 5}))
    assert inspect_model(str(model)).pad_token_id == 5


def test_every_norm_is_read_from_its_published_name(llada_dir, tmp_path):
    """The tiny checkpoint's norms are all ones, under which a swapped norm name (attn_norm read as ff_norm)
    computes the same function: with distinct norms, the logits must still be the reference's."""
    model_dir = with_distinct_norms(llada_dir, tmp_path / "m")
    gen = torch.Generator().manual_seed(1)
    model = load_model(str(model_dir), device="cpu").model
    ids = torch.randint(3, model.vocab_size, (1, 9), generator=gen)
    expected = ReferenceModel(model_dir)(ids, torch.ones_like(ids))[0].float()
    logits = model.logits(model(ids, torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool)))[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_pad_token_id_outside_the_vocabulary_is_refused_at_startup(llada_dir, tmp_path):
    """It failed every batch's embedding lookup: IndexError in every shard of the run."""
    model = tmp_path / "m"
    shutil.copytree(llada_dir, model)
    generation = model / "generation_config.json"
    raw = json.loads(generation.read_text()) if generation.exists() else {}
    generation.write_text(json.dumps({**raw, "pad_token_id": 500}))
    with pytest.raises(ModelError, match=r"generation_config.json: pad_token_id=500 is not a token id"):
        inspect_model(str(model))
