"""The DiffusionGemma loader the workers run (models/gemma_checkpoint.py, gemma_config.py, gemma_layers.py: no
transformers modeling) builds the model transformers builds from the same files: the same parameters and
buffers, the same module outputs, the same config reading and the same tokenizer. Refusals name what is wrong.
(Logits against transformers' forward: test_diffusion_gemma.py, which runs this loader.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.activations import ACT2FN

from benchmarks.bench_generate import SHAPES
from pipeline.models import gemma_config, gemma_layers
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.models.gemma_checkpoint import load_text_weights
from pipeline.models.loader import ModelError, inspect_model, load_model, load_tokenizer
from pipeline.models.tiny import TINY_VISION_CONFIG, tiny_text_config
from tests.support.models import build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("gemma") / "m", canvas_length=16, text_overrides={"sliding_window": 8}
    )


def _transformers(path: Path, dtype: torch.dtype = torch.float32) -> DiffusionGemmaTextModel:
    return DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval())


def _assert_same_tensors(native: DiffusionGemmaTextModel, reference: DiffusionGemmaTextModel) -> None:
    ours, theirs = dict(native.named_parameters()), dict(reference.named_parameters())
    assert sorted(ours) == sorted(theirs)
    ours.update(native.named_buffers())
    theirs.update(reference.named_buffers())  # transformers also keeps an unused copy of each inv_freq
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weights_buffers_and_module_outputs_are_transformers(checkpoint, dtype):
    native = DiffusionGemmaTextModel(load_text_weights(checkpoint, dtype=dtype))
    reference = _transformers(checkpoint, dtype)
    _assert_same_tensors(native, reference)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, native.hidden_size, generator=gen).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [500, 501, 502, 503, 504]])
    layer = native.layers[0]
    ref_layer = reference.layers[0]
    pairs = [
        (native.self_conditioning(x, x.flip(0)), reference.self_conditioning(x, x.flip(0))),
        (layer.mlp(x), ref_layer.mlp(x)),
        (
            native.embed_tokens(positions % native.vocab_size),
            reference.embed_tokens(positions % native.vocab_size),
        ),
        (native.norm(x), reference.norm(x)),
    ]
    for layer_type in ("sliding_attention", "full_attention"):
        pairs += list(
            zip(
                native.rotary_emb(x, positions, layer_type),
                reference.rotary_emb(x, positions, layer_type),
                strict=True,
            )
        )
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_sharded_checkpoint_loads_the_same_weights(checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).save_pretrained(
        sharded, max_shard_size="300KB"
    )
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / WEIGHTS).exists()
    _assert_same_tensors(DiffusionGemmaTextModel(load_text_weights(sharded)), _transformers(checkpoint))


LEGACY_ROPE = {
    "rope_theta": 5000.0,
    "partial_rotary_factor": 0.5,
    "rope_parameters": {
        "sliding_attention": {"type": "default", "partial_rotary_factor": 1.0},
        "full_attention": {"type": "proportional", "factor": 4.0, "rope_theta": 1e6},
    },
}
CONFIGS = {
    "tiny": {"text_config": tiny_text_config()},
    "26b-a4b": {"text_config": dict(SHAPES["26b-a4b"]), "canvas_length": 256},
    "defaults": {"text_config": {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 64}},
    "per-layer": {
        "text_config": tiny_text_config(per_layer_config={"3": {"head_dim": 48, "num_key_value_heads": 4}}),
        "canvas_length": 8,
        "tie_word_embeddings": False,
    },
    "last-layer-forced-full": {"text_config": tiny_text_config(layer_types=["sliding_attention"] * 4)},
    # null: no overrides at all (global_head_dim is then ignored, not applied to the full layers)
    "per-layer-null": {"text_config": tiny_text_config(per_layer_config=None)},
    # overrides equal to the global value and an empty skip list change nothing
    "per-layer-no-ops": {
        "text_config": tiny_text_config(
            per_layer_config={
                "3": {"head_dim": 64, "num_key_value_heads": 1, "sliding_window": 64},
                "0": {"skip": []},
            }
        )
    },
    # a legacy `type` key and rope_theta / partial_rotary_factor at the top of text_config, as older configs have
    "legacy-rope": {"text_config": tiny_text_config(**LEGACY_ROPE)},
    # every token routed to every expert (dense routing) is a valid mixture of experts
    "top-k-all-experts": {"text_config": tiny_text_config(top_k_experts=4)},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_read_as_transformers_reads_it(name):
    raw = CONFIGS[name]
    ours = gemma_config.parse_config(json.loads(json.dumps(raw)))  # as from a file: string keys
    theirs = DiffusionGemmaConfig(**json.loads(json.dumps(raw)), vision_config=dict(TINY_VISION_CONFIG))
    text = theirs.text_config
    for field in set(gemma_config.TEXT_DEFAULTS) - set(
        gemma_config.PER_LAYER_KEYS
    ):  # those: per layer, below
        assert getattr(ours.text_config, field) == getattr(text, field), field
    assert list(ours.text_config.layer_types) == text.layer_types
    text.standardize_rope_params()  # what transformers' RoPE initialisation reads (legacy keys resolved)
    assert ours.text_config.rope_parameters == {t: text.rope_parameters[t] for t in set(text.layer_types)}
    layers = range(text.num_hidden_layers)
    assert list(ours.text_config.head_dims) == [text.per_layer_config[i].head_dim for i in layers]
    assert list(ours.text_config.kv_heads) == [text.per_layer_config[i].num_key_value_heads for i in layers]
    assert (ours.canvas_length, ours.tie_word_embeddings) == (
        theirs.canvas_length,
        theirs.tie_word_embeddings,
    )


def test_a_legacy_rope_config_computes_transformers_frequencies(checkpoint, tmp_path):
    """A rope `type` read as the default rope type gave the full layers other frequencies (max difference 0.75,
    logits off by 1.4) without any error."""
    legacy = _edit(checkpoint, tmp_path / "legacy", config=dict(LEGACY_ROPE))
    _assert_same_tensors(DiffusionGemmaTextModel(load_text_weights(legacy)), _transformers(Path(legacy)))


def test_a_single_weights_file_is_read_before_an_index_beside_it(checkpoint, tmp_path):
    """transformers' from_pretrained reads model.safetensors when both it and an index are there."""
    both = tmp_path / "both"
    DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).save_pretrained(both, max_shard_size="300KB")

    def sharper(state):
        state["model.decoder.norm.weight"] = state["model.decoder.norm.weight"] * 2

    single = _edit(checkpoint, tmp_path / "single", tensors=sharper)
    shutil.copy(Path(single) / WEIGHTS, both / WEIGHTS)
    _assert_same_tensors(DiffusionGemmaTextModel(load_text_weights(both)), _transformers(both))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff{", "is not a JSON file"),
        (b"[1]", "has no weight_map"),
        (b"{}", "has no weight_map"),
        (b'{"weight_map": {}}', "has no weight_map"),
    ],
    ids=["not-utf8", "a-list", "no-map", "empty-map"],
)
def test_an_index_that_is_not_a_weight_map_is_refused_naming_it(checkpoint, tmp_path, content, message):
    """A list ended in an AttributeError ('list' object has no attribute 'get'), bytes that are not UTF-8 in a
    UnicodeDecodeError, neither naming the file."""
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded)
    (sharded / WEIGHTS).unlink()
    (sharded / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ModelError, match=r"model\.safetensors\.index\.json " + message):
        load_model(str(sharded))


def test_every_activation_the_config_accepts_is_transformers_function():
    assert set(gemma_layers.ACTIVATIONS) == set(gemma_config.ACTIVATIONS)
    x = torch.linspace(-6, 6, 97)
    for name, fn in gemma_layers.ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), rtol=0, atol=0, msg=name)


def _edit(checkpoint: Path, out: Path, *, config=None, tensors=None) -> str:
    """A copy of `checkpoint` with config.json's text_config updated by `config` and its tensors edited by
    `tensors` (a function of the state dict)."""
    shutil.copytree(checkpoint, out)
    if config is not None:
        data = json.loads((out / "config.json").read_text())
        data.update(config.pop("top", {}))
        data["text_config"].update(config)
        (out / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(out / WEIGHTS)
        tensors(state)
        save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    return str(out)


def test_a_checkpoint_missing_a_tensor_or_with_a_wrong_shape_is_refused_naming_it(checkpoint, tmp_path):
    name = "model.decoder.layers.1.mlp.up_proj.weight"
    missing = _edit(checkpoint, tmp_path / "missing", tensors=lambda s: s.pop(name))
    with pytest.raises(ModelError, match=rf"cannot load the weights from .*lacks 1 tensor\(s\): {name}"):
        load_model(missing)

    def shrink(state):
        state[name] = state[name][:-1]

    shape = _edit(checkpoint, tmp_path / "shape", tensors=shrink)
    with pytest.raises(ModelError) as error:
        load_model(shape)
    assert str(error.value) == (  # the folder named once ("<dir>: <dir>: tensor ...")
        f"cannot load the weights from {shape}: tensor {name} has shape (255, 128); the config implies (256, 128)"
    )


def test_a_checkpoint_without_the_encoders_layer_scalars_is_refused(checkpoint, tmp_path):
    """transformers leaves a missing encoder scalar uninitialised (any value: 1.7e+28 in one run), so the
    encoder of such a checkpoint is undefined; the decoder's default to 1 in both."""
    name = "model.encoder.language_model.layers.2.layer_scalar"
    without = _edit(checkpoint, tmp_path / "no-scalar", tensors=lambda s: s.pop(name))
    with pytest.raises(ModelError, match=rf"lacks 1 tensor\(s\): {name}"):
        load_model(without)
    decoder_only = _edit(
        checkpoint,
        tmp_path / "no-decoder-scalar",
        tensors=lambda s: s.pop("model.decoder.layers.2.layer_scalar"),
    )
    _assert_same_tensors(
        DiffusionGemmaTextModel(load_text_weights(decoder_only)), _transformers(Path(decoder_only))
    )


def test_encoder_weights_or_a_head_of_their_own_are_refused_and_equal_ones_load(checkpoint, tmp_path):
    twin = "model.decoder.layers.0.mlp.up_proj.weight"

    def differing(state):
        state["model.encoder.language_model.layers.0.mlp.up_proj.weight"] = state[twin] + 1e-3

    with pytest.raises(
        ModelError, match="layers.0.mlp.up_proj.weight differs from the decoder's weight.*tied"
    ):
        load_model(_edit(checkpoint, tmp_path / "encoder", tensors=differing))

    def head(state):
        state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"].flip(0)

    with pytest.raises(ModelError, match="lm_head.weight differs"):
        load_model(_edit(checkpoint, tmp_path / "head", tensors=head))

    def encoder_embedding(state):  # the encoder embeds the prompt: another one computes another function
        state["model.encoder.language_model.embed_tokens.weight"] = (
            state["model.decoder.embed_tokens.weight"] * 2
        )

    with pytest.raises(ModelError, match="language_model.embed_tokens.weight differs"):
        load_model(_edit(checkpoint, tmp_path / "encoder-embedding", tensors=encoder_embedding))

    def equal(state):
        for key in [k for k in state if k.startswith("model.decoder.layers.")]:
            if not key.endswith("layer_scalar"):
                state["model.encoder.language_model." + key[len("model.decoder.") :]] = state[key].clone()
        state["model.encoder.language_model.embed_tokens.weight"] = state[
            "model.decoder.embed_tokens.weight"
        ].clone()
        state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"].clone()

    untied = _edit(
        checkpoint, tmp_path / "untied", config={"top": {"tie_word_embeddings": False}}, tensors=equal
    )
    loaded = load_model(untied)
    _assert_same_tensors(loaded.model, _transformers(checkpoint))
    bare = _edit(checkpoint, tmp_path / "untied-bare", config={"top": {"tie_word_embeddings": False}})
    with pytest.raises(ModelError, match="tie_word_embeddings=False, and the checkpoint lacks .* at random"):
        load_model(bare)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"num_experts": None}, r"text_config.num_experts is not set"),
        ({"hidden_size": "128"}, r"text_config.hidden_size='128' must be a positive integer"),
        ({"hidden_activation": "gelu_new"}, r"text_config.hidden_activation='gelu_new' is not supported; canvasflow runs"),
        ({"layer_types": ["full_attention"]}, r"text_config.layer_types must list one type per layer \(4\)"),
        ({"per_layer_config": {"2": {"intermediate_size": 8}}}, r"text_config.per_layer_config\['2'\] sets \['intermediate_size'\]"),
        (
            {"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0}, "full_attention": {}}},
            r"text_config.rope_parameters\['full_attention'\] must be an object with a rope_theta",
        ),
        (
            {"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                                 "full_attention": {"rope_theta": 1.0}}},
            r"text_config.rope_parameters\['sliding_attention'\].rope_type='yarn' is not supported",
        ),
        (
            {"per_layer_config": {"1": {"head_dim": 16}}},
            r"the sliding_attention layers have head dims \[16, 32\]; canvasflow needs one per layer type",
        ),
        ({"use_bidirectional_attention": "all"}, r"text_config.use_bidirectional_attention='all' .* not supported"),
        ({"top": {"canvas_length": 0}}, r"canvas_length=0 must be a positive integer"),
        ({"top_k_experts": 5}, r"text_config.top_k_experts=5 exceeds num_experts=4"),
        ({"rms_norm_eps": 0}, r"text_config.rms_norm_eps=0 must be a number in \(0, 1\)"),
        ({"sliding_window": True}, r"text_config.sliding_window=True must be a positive integer"),
        ({"num_key_value_heads": 3}, r"layer 0: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (  # transformers rotates a part of each head then; gemma_layers' default RoPE rotates all of it
            {"rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 1.0, "partial_rotary_factor": 0.5},
                "full_attention": {"rope_theta": 1.0},
            }},
            r"text_config.rope_parameters\['sliding_attention'\]: a partial_rotary_factor with rope_type 'default'",
        ),
    ],
    ids=[
        "no-experts", "string-size", "activation", "layer-types", "per-layer-key", "rope-theta", "rope-type",
        "head-dims", "bidirectional", "canvas", "top-k", "eps", "bool-size", "kv-heads", "partial-default-rope",
    ],
)  # fmt: skip
def test_a_config_the_forward_cannot_run_is_refused_at_startup_naming_the_value(
    checkpoint, tmp_path, edit, message
):
    """inspect_model is what the driver runs before starting any worker."""
    model_dir = _edit(checkpoint, tmp_path / "m", config=dict(edit))
    with pytest.raises(ModelError, match=rf"config.json: {message}"):
        inspect_model(model_dir)


@pytest.mark.parametrize("model", ["builtin:tiny-diffusiongemma", "builtin:tiny-llada"])
def test_loading_a_model_imports_no_transformers_modeling(model):
    """What a worker pays before its first token: transformers' DiffusionGemma modeling, torch._dynamo (which
    building modules on the meta device can pull in) and the hub-kernel integrations cost 4-5 s of imports;
    the loaders need none of them."""
    heavy = [
        "transformers.models.diffusion_gemma.modeling_diffusion_gemma",
        "torch._dynamo",
        "transformers.conversion_mapping",
    ]
    code = (
        "import sys\nfrom pipeline.models.loader import load_model\n"
        f"loaded = load_model({model!r})\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "declared", [None, "TokenizersBackend", "PreTrainedTokenizerFast", "GemmaTokenizerFast"]
)
def test_the_tokenizer_is_the_one_autotokenizer_loads(checkpoint, tmp_path, declared):
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if declared is None:
        config.pop("tokenizer_class")
    else:
        config["tokenizer_class"] = declared
    config_path.write_text(json.dumps(config))
    ours, theirs = load_tokenizer(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))
    assert type(ours) is type(theirs)
    text = "Sort: 3 1 2\n<end_of_turn> done\t!"
    assert ours(text).input_ids == theirs(text).input_ids
    chat = [{"role": "user", "content": "Sort: 3 1 2"}]
    assert ours.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    ) == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours.all_special_ids == theirs.all_special_ids and ours.eos_token_id == theirs.eos_token_id


def test_a_model_type_canvasflow_does_not_run_is_refused_naming_it(tmp_path):
    """A config.json of another architecture fails at startup naming its model_type and those that run."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(
        ModelError, match=r"model_type 'llama' is not supported; canvasflow runs diffusion_gemma, llada"
    ):
        inspect_model(str(tmp_path))


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("generation_config.json", {"pad_token_id": 5000}, r"generation_config.json: pad_token_id=5000"),
        (
            "generation_config.json",
            {"eos_token_id": [1, 128]},
            r"generation_config.json: eos_token_id=\[1, 128\]",
        ),
        ("config.json", {"pad_token_id": 128}, r"config.json: text_config.pad_token_id=128"),
        ("config.json", {"eos_token_id": "1"}, r"config.json: text_config.eos_token_id=\['1'\]"),
    ],
    ids=["generation-pad", "generation-eos", "config-pad", "config-eos-string"],
)
def test_a_special_token_id_outside_the_vocabulary_is_refused_at_startup_naming_it(
    checkpoint, tmp_path, file, edit, message
):
    """A pad id past the vocabulary made every shard fail in the embedding lookup ("IndexError: index out of
    range in self", exit 1); an EOS id past it never ended a row. Both now fail inspect_model, which the
    driver and LLM run before any worker starts."""
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint, model_dir)
    generation = model_dir / "generation_config.json"
    if file == "generation_config.json":
        generation.write_text(json.dumps({**json.loads(generation.read_text()), **edit}))
    else:
        generation.write_text(
            json.dumps({k: v for k, v in json.loads(generation.read_text()).items() if k not in edit})
        )
        config = json.loads((model_dir / "config.json").read_text())
        config["text_config"].update(edit)
        (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=rf"{message} is not a token id of the model's vocabulary .*=128\)"):
        inspect_model(str(model_dir))
