"""The training objective: re-noising, self-conditioning masking, and that the training forward (transformers,
unpadded same-length prompts, default positions) computes what canvasflow's sampler forward computes."""

import pytest
import torch

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel, softcapped_logits
from pipeline.training.config import TrainConfig
from pipeline.training.loop import build_model
from pipeline.training.objective import ObjectiveSettings, diffusion_loss, renoise

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TrainConfig()).eval()


def _batch(batch=4, prompt=28, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, 100, (batch, prompt), generator=g)
    target = torch.randint(5, 100, (batch, length), generator=g)
    return prompt_ids, target


def test_renoise_rates_and_shapes():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, VOCAB, (3, 2000), generator=g)
    noisy = renoise(target, torch.tensor([0.0, 0.5, 1.0]), VOCAB, g)
    assert noisy.canvas.shape == target.shape and noisy.canvas.dtype == torch.long
    assert torch.equal(noisy.canvas[0], target[0]) and not noisy.replaced[0].any()
    assert noisy.replaced[2].all()
    assert 0.45 < noisy.replaced[1].float().mean() < 0.55
    # replaced positions hold uniform tokens over the whole vocabulary (the sampler's noise)
    kept = ~noisy.replaced
    assert torch.equal(noisy.canvas[kept], target[kept])
    assert noisy.canvas[2].min() == 0 and noisy.canvas[2].max() == VOCAB - 1
    with pytest.raises(ValueError, match=r"rate must be \[B\]=3"):
        renoise(target, torch.tensor([0.5]), VOCAB, g)


def test_training_forward_equals_the_sampler_forward(model):
    """Unpadded prompts of one length: HF's default positions (prompt 0..P-1, canvas P..P+L-1) are the
    sampler's, so the logits the model is trained on are the logits it samples from."""
    prompt_ids, canvas = _batch(batch=3, prompt=27)
    with torch.no_grad():
        hf_logits = model(input_ids=prompt_ids, decoder_input_ids=canvas).logits  # [B, L, V]
        native = DiffusionGemmaTextModel(model)
        cache = native.new_cache(3, 64 + 32)
        slots = torch.arange(3)
        padded = torch.zeros(3, 32, dtype=torch.long)
        padded[:, :27] = prompt_ids  # the sampler pads the encoder batch; lengths mask it
        native.encode(cache, slots, padded, torch.full((3,), 27), prefix=True)
        hidden = native.denoise(cache, slots, canvas, None, prefix=True)
        ours = softcapped_logits(hidden, native.embedding, native.softcap)
    torch.testing.assert_close(ours, hf_logits, atol=2e-4, rtol=2e-4)


def test_self_conditioning_input_matches_the_sampler(model):
    """The training feed (logits z / T) equals the sampler's soft embeddings softmax(z / T) @ E."""
    prompt_ids, canvas = _batch(batch=2, prompt=26, seed=1)
    z = torch.randn(2, 32, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        hf_logits = model(
            input_ids=prompt_ids,
            decoder_input_ids=canvas,
            self_conditioning_logits=z,
            self_conditioning_mask=torch.tensor([True, False]),
        ).logits
        native = DiffusionGemmaTextModel(model)
        cache = native.new_cache(2, 32 + 32)
        slots = torch.arange(2)
        native.encode(
            cache,
            slots,
            torch.cat([prompt_ids, torch.zeros(2, 6, dtype=torch.long)], 1),
            torch.full((2,), 26),
            prefix=True,
        )
        soft = torch.softmax(z, dim=-1) @ native.embedding
        soft[1] = 0  # the masked example: as at the first denoising step
        ours = softcapped_logits(
            native.denoise(cache, slots, canvas, soft, prefix=True), native.embedding, native.softcap
        )
        plain = model(input_ids=prompt_ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(ours, hf_logits, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(hf_logits[1], plain[1], atol=1e-5, rtol=1e-5)  # mask off = no self-cond.
    assert (hf_logits[0] - plain[0]).abs().max() > 1e-3  # mask on changes the prediction


def test_loss_shapes_and_self_conditioning_mask(model):
    prompt_ids, target = _batch(batch=16)
    settings = ObjectiveSettings(vocab_size=VOCAB, self_conditioning_prob=0.5)
    out = diffusion_loss(model, prompt_ids, target, settings, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (16, 32, VOCAB)
    assert out.sc_mask.shape == (16,) and 0 < int(out.sc_mask.sum()) < 16
    assert (out.noisy.rate >= settings.noise_floor).all() and (out.noisy.rate <= 1).all()
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), target.reshape(-1))
    torch.testing.assert_close(out.loss.detach(), expected)


def test_loss_draws_are_reproducible_and_independent_of_the_branch(model):
    prompt_ids, target = _batch(batch=8)
    never = ObjectiveSettings(vocab_size=VOCAB, self_conditioning_prob=0.0)
    always = ObjectiveSettings(vocab_size=VOCAB, self_conditioning_prob=1.0)
    a = diffusion_loss(model, prompt_ids, target, never, torch.Generator().manual_seed(5))
    b = diffusion_loss(model, prompt_ids, target, always, torch.Generator().manual_seed(5))
    c = diffusion_loss(model, prompt_ids, target, never, torch.Generator().manual_seed(5))
    assert not a.sc_mask.any() and b.sc_mask.all()
    assert torch.equal(a.noisy.canvas, b.noisy.canvas)  # same noise whether or not self-conditioning runs
    assert torch.equal(a.logits, c.logits)
    assert not torch.allclose(a.logits, b.logits)
