"""The native forward computes transformers' DiffusionGemma function: logits compared on tiny configs (CPU)
and on the released 26B-A4B text shape (GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DynamicCache

from benchmarks.bench_generate import SHAPES, VISION
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel, softcapped_logits
from pipeline.models.gemma_checkpoint import load_text_weights
from pipeline.models.moe import moe_forward
from tests.support.hf_compat import cache_kw, cache_of
from tests.support.models import build_checkpoint

FP32_TOLERANCE = dict(atol=2e-4, rtol=1e-4)
NAMES = ["canvas", "self-conditioned", "second canvas"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A sliding window shorter than prompt + canvas, so both window rules (encoder and decoder) matter.
    return build_checkpoint(
        tmp_path_factory.mktemp("native") / "m", canvas_length=16, text_overrides={"sliding_window": 8}
    )


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    """For the interpreted fused norms, whose cost is per row and layer: one sliding layer (window 8) and one
    global keep both window rules and the chain of fused norms (a layer's tail computes the next layer's input
    norm, the last one's the final norm) at half the work of the four layers."""
    two_layers = {
        "sliding_window": 8,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    return build_checkpoint(
        tmp_path_factory.mktemp("native2") / "m", canvas_length=16, text_overrides=two_layers
    )


def _reference(hf, prompt, canvas1, canvas2, self_cond):
    """transformers' logits for: canvas1 after the prompt; canvas1 with self-conditioning; canvas2 after
    prompt + canvas1 (encoded into the cache)."""
    batch, prompt_len = prompt.shape
    length = canvas1.shape[1]
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    first = hf(input_ids=prompt, **cache_kw(cache), decoder_input_ids=canvas1)
    positions = torch.arange(prompt_len, prompt_len + length)[None]
    with_sc = hf(
        **cache_kw(cache_of(first)),
        decoder_input_ids=canvas1,
        self_conditioning_logits=self_cond,
        decoder_position_ids=positions,
    ).logits
    enc = hf.model.encoder(input_ids=canvas1, **cache_kw(cache_of(first)), position_ids=positions)
    second = hf(
        **cache_kw(cache_of(enc)),
        decoder_input_ids=canvas2,
        decoder_position_ids=torch.arange(prompt_len + length, prompt_len + 2 * length)[None],
    ).logits
    return first.logits, with_sc, second


def _ours(native, prompt, canvas1, canvas2, self_cond, slots):
    """canvasflow's logits for the same three forwards as _reference (rows in cache slots `slots`)."""
    prompt_len, length = prompt.shape[1], canvas1.shape[1]
    device, dtype = prompt.device, native.embedding.dtype
    cache = native.new_cache(max(slots) + 2, -(-(prompt_len + 2 * length + 16) // 64) * 64)
    index = torch.tensor(slots, device=device)
    prefix = slots == list(range(len(slots)))
    rows = len(slots)
    padded = torch.cat([prompt, torch.zeros(rows, 3, dtype=torch.long, device=device)], dim=1)  # padding past
    native.encode(cache, index, padded, torch.full((rows,), prompt_len, device=device), prefix=prefix)
    soft = self_cond.softmax(-1, dtype=torch.float32).to(dtype) @ native.embedding
    got = [
        softcapped_logits(
            native.denoise(cache, index, canvas1, None, prefix=prefix), native.embedding, native.softcap
        ),
        softcapped_logits(
            native.denoise(cache, index, canvas1, soft, prefix=prefix), native.embedding, native.softcap
        ),
    ]
    native.encode(cache, index, canvas1, torch.full((rows,), length, device=device), prefix=prefix)
    got.append(
        softcapped_logits(
            native.denoise(cache, index, canvas2, None, prefix=prefix), native.embedding, native.softcap
        )
    )
    assert cache.lengths[index].tolist() == [prompt_len + length] * rows
    return got


def _assert_bf16_error_like_transformers(got, expected, exact):
    """Our bf16 error against float32 truth (transformers' float32 forward of the same weights) must be of the
    size of transformers' own bf16 error (`expected`)."""
    for name, ours, ref, truth in zip(NAMES, got, expected, exact, strict=True):
        ours_err = (ours.float() - truth).abs().mean().item()
        ref_err = (ref.float() - truth).abs().mean().item()
        assert ours_err <= 1.5 * ref_err + 1e-3, (
            f"{name}: bf16 error {ours_err:.4f} vs transformers' {ref_err:.4f}"
        )


# The model's norms on either kernel backend (Triton: fused, interpreted on a CPU; see tests/conftest.py).
BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton"], ids=["torch-norms", "fused-norms"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "slots, backend, model",
    # Six rows: the bf16 comparison averages over enough positions that a one-ulp difference somewhere in the
    # tiny random model does not swing it (with two rows it moved by up to 1.7x between seeds; with three, up
    # to 0.97 of the bound over 16 seeds, where six stay below 0.87 with two or four layers).
    [
        (list(range(6)), "torch", "checkpoint"),
        ([7, 1, 4, 0, 6, 2], "torch", "checkpoint"),
        ([7, 1, 4, 0, 6, 2], "triton", "two_layer_checkpoint"),
    ],
    ids=["prefix-slots-torch-norms", "scattered-slots-torch-norms", "scattered-slots-fused-norms"],
)
def test_logits_match_transformers(request, dtype, slots, backend, model):
    checkpoint = request.getfixturevalue(model)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=dtype).eval()
    # The model as the workers load it (models/gemma_checkpoint.py), transformers' as the reference.
    native = DiffusionGemmaTextModel(load_text_weights(checkpoint, dtype=dtype), backend=backend)
    gen = torch.Generator().manual_seed(0)
    vocab, length, prompt_len = native.vocab_size, native.canvas_length, 13
    rows = len(slots)
    prompt = torch.randint(5, vocab, (rows, prompt_len), generator=gen)
    canvas1 = torch.randint(0, vocab, (rows, length), generator=gen)
    canvas2 = torch.randint(0, vocab, (rows, length), generator=gen)
    self_cond = torch.randn(rows, length, vocab, generator=gen).to(dtype)
    with torch.no_grad():
        expected = _reference(hf, prompt, canvas1, canvas2, self_cond)

    got = _ours(native, prompt, canvas1, canvas2, self_cond, slots)
    if dtype == torch.float32:
        for name, ours, ref in zip(NAMES, got, expected, strict=True):
            torch.testing.assert_close(ours, ref, **FP32_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
        return
    hf32 = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        exact = _reference(hf32, prompt, canvas1, canvas2, self_cond.float())
    _assert_bf16_error_like_transformers(got, expected, exact)


def test_rows_of_different_lengths_are_independent(checkpoint):
    """A row's logits do not depend on the other rows of its batch (their lengths, their content)."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    native = DiffusionGemmaTextModel(hf)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 13, 20]
    prompts = [torch.randint(5, native.vocab_size, (n,), generator=gen) for n in lengths]
    canvas = torch.randint(0, native.vocab_size, (3, native.canvas_length), generator=gen)
    batch_cache = native.new_cache(3, 64)
    tokens = torch.zeros(3, 32, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    native.encode(batch_cache, torch.arange(3), tokens, torch.tensor(lengths), prefix=True)
    together = native.denoise(batch_cache, torch.arange(3), canvas, None, prefix=True)
    for i, p in enumerate(prompts):
        alone_cache = native.new_cache(3, 64)
        row = torch.zeros(1, 32, dtype=torch.long)
        row[0, : len(p)] = p
        native.encode(alone_cache, torch.tensor([0]), row, torch.tensor([len(p)]), prefix=True)
        alone = native.denoise(alone_cache, torch.tensor([0]), canvas[i : i + 1], None, prefix=True)
        assert torch.equal(alone[0], together[i]), f"row {i} changed with its neighbours"


def test_grouped_and_dense_moe_agree(checkpoint):
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    layer = hf.model.decoder.layers[0]
    x = torch.randn(37, hf.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, weights, index = layer.router(x)
    dense = moe_forward(layer.experts, x, index, weights, path="dense")
    grouped = moe_forward(layer.experts, x, index, weights, path="grouped")
    reference = layer.experts(x, index, weights)  # transformers' own expert loop
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)
    from pipeline.models import moe

    moe._grouped_mm_broken.add((x.device.type, x.dtype))  # where torch._grouped_mm is unavailable
    try:
        looped = moe_forward(layer.experts, x, index, weights, path="grouped")
    finally:
        moe._grouped_mm_broken.discard((x.device.type, x.dtype))
    torch.testing.assert_close(looped, reference, atol=1e-5, rtol=1e-5)


def test_reading_only_the_used_part_of_the_slots_gives_the_same_logits(checkpoint):
    """kv_limit (used on CUDA) must cover every key a row attends to: results equal the full-capacity read."""
    native = DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval())
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 21])
    tokens = torch.randint(5, native.vocab_size, (2, 32), generator=gen)
    canvas = torch.randint(0, native.vocab_size, (2, native.canvas_length), generator=gen)
    outs = []
    for limit in (None, 48):
        cache = native.new_cache(2, 128)
        native.encode(cache, torch.arange(2), tokens, lengths, prefix=True, kv_limit=limit and 32)
        outs.append(native.denoise(cache, torch.arange(2), canvas, None, prefix=True, kv_limit=limit))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@BACKENDS
@pytest.mark.parametrize(
    "shape, device, layers, prompt_len",
    [
        pytest.param("tiny", "cpu", 2, 13, id="bench-tiny-cpu"),
        pytest.param("26b-a4b", "cuda", 6, 128, id="26b-a4b-6-layers", marks=pytest.mark.gpu),
    ],
)
def test_benchmark_shapes_match_transformers_in_bf16(shape, device, layers, prompt_len, backend):
    """The shapes bench_generate.py measures (the 26B-A4B one: its first six layers, five sliding and one
    global, 128 experts top-8, vocabulary 262,144, canvas 256), random bf16 weights built on the device."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    text = dict(SHAPES[shape], num_hidden_layers=layers, layer_types=SHAPES[shape]["layer_types"][:layers])
    canvas = 256 if device == "cuda" else 16
    config = DiffusionGemmaConfig(text_config=text, vision_config=dict(VISION), canvas_length=canvas)
    torch.manual_seed(0)
    with torch.device(device):
        hf = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.bfloat16).eval()
    # Scales (norm weights, router scales, layer scalars) at their init values: with random ones the bf16
    # comparison of the tiny shape swings past its bound with the draw (2 or 4 rows: up to 1.07 of it on
    # torch 2.11); the fp32 logits tests above check the scales.
    hf32 = copy.deepcopy(hf).float()
    native = DiffusionGemmaTextModel(hf, backend=backend)
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = native.vocab_size
    prompt = torch.randint(5, vocab, (2, prompt_len), generator=gen, device=device)
    canvas1 = torch.randint(0, vocab, (2, canvas), generator=gen, device=device)
    canvas2 = torch.randint(0, vocab, (2, canvas), generator=gen, device=device)
    self_cond = torch.randn(2, canvas, vocab, generator=gen, device=device).to(torch.bfloat16)
    with torch.no_grad():
        expected = _reference(hf, prompt, canvas1, canvas2, self_cond)
        exact = _reference(hf32, prompt, canvas1, canvas2, self_cond.float())
    got = _ours(native, prompt, canvas1, canvas2, self_cond, [1, 0])
    _assert_bf16_error_like_transformers(got, expected, exact)


def _untied_model() -> DiffusionGemmaForBlockDiffusion:
    """A DiffusionGemma with tie_word_embeddings=False: transformers then keeps the encoder's weights and the
    head (lm_head) apart from the decoder's, each with its own values."""
    from pipeline.models.tiny import TINY_VISION_CONFIG, tiny_text_config

    config = DiffusionGemmaConfig(
        text_config=tiny_text_config(sliding_window=8),
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(config).eval()


def test_untied_weights_are_refused():
    """Our forward encodes with the decoder's weights and reads logits off the decoder's embedding (the tied
    layout). A checkpoint whose encoder or head has weights of its own would get other logits than
    transformers' (max |error| ~1.5 on the tiny model), so it is refused rather than run."""
    hf = _untied_model()
    with pytest.raises(ValueError, match="tied"):
        DiffusionGemmaTextModel(hf)


def test_untied_layout_with_equal_weights_matches_transformers():
    """tie_word_embeddings=False with the encoder's weights and the head equal to the decoder's computes the
    tied function: it loads, and its logits are transformers'."""
    hf = _untied_model()
    decoder = dict(hf.model.decoder.named_parameters())
    with torch.no_grad():
        for name, param in hf.model.encoder.language_model.named_parameters():
            param.copy_(decoder[name])
        hf.lm_head.weight.copy_(hf.model.decoder.embed_tokens.weight)
    native = DiffusionGemmaTextModel(hf)
    gen = torch.Generator().manual_seed(0)
    vocab, length = native.vocab_size, native.canvas_length
    prompt = torch.randint(5, vocab, (2, 13), generator=gen)
    canvas1 = torch.randint(0, vocab, (2, length), generator=gen)
    canvas2 = torch.randint(0, vocab, (2, length), generator=gen)
    self_cond = torch.randn(2, length, vocab, generator=gen)
    with torch.no_grad():
        expected = _reference(hf, prompt, canvas1, canvas2, self_cond)
    got = _ours(native, prompt, canvas1, canvas2, self_cond, [0, 1])
    for name, ours, ref in zip(NAMES, got, expected, strict=True):
        torch.testing.assert_close(ours, ref, **FP32_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def test_bidirectional_encoder_config_is_refused():
    """use_bidirectional_attention="all" makes transformers' encoder non-causal and rewrites sliding_window to
    window // 2 + 1 (a two-sided bound); our encoder is causal and would read that value as a causal window.
    (transformers 5.24 cannot run this config either: its encoder attention passes is_causal twice.)"""
    from pipeline.models.tiny import TINY_VISION_CONFIG, tiny_text_config

    config = DiffusionGemmaConfig(
        text_config=tiny_text_config(sliding_window=8, use_bidirectional_attention="all"),
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=16,
    )
    torch.manual_seed(0)
    hf = DiffusionGemmaForBlockDiffusion(config).eval()
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        DiffusionGemmaTextModel(hf)
