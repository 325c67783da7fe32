"""canvasflow's sampler against transformers' DiffusionGemma itself (not a re-implementation of it).

(a) step level: acceptance, re-noising and stopping decisions equal EntropyBoundSampler's and
    StableAndConfidentStoppingCriteria's on identical logits and random draws, ties and frozen rows included;
(b) end to end: in the test-only torch_global random mode (same random calls, shapes and order as
    transformers, static batch) completions equal `generate`'s token for token;
(c) in the production keyed mode, denoising steps per canvas agree with transformers' statistics.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, LogitsProcessorList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from pipeline.kernels.step import step_reference
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.settings import SamplerSettings
from tests.support.hf_compat import cache_kw
from tests.support.models import ScriptedModel, build_checkpoint

EOS = 1


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits).entropy()


def _random_logits(
    gen: torch.Generator, rng: random.Random, batch: int, length: int, vocab: int
) -> torch.Tensor:
    scale = rng.choice([0.05, 1.0, 4.0, 20.0])
    logits = torch.randn(batch, length, vocab, generator=gen) * scale
    if rng.random() < 0.5 and length > 1:  # exact entropy ties: repeated (or vocab-permuted) positions
        for _ in range(rng.randint(1, length)):
            src, dst = rng.randrange(length), rng.randrange(length)
            row = logits[:, src]
            logits[:, dst] = row[:, torch.randperm(vocab, generator=gen)] if rng.random() < 0.5 else row
    if rng.random() < 0.3:  # a whole row repeated: identical entropy profiles across rows
        logits[-1] = logits[0]
    return logits


@pytest.mark.parametrize("case", range(80))
def test_acceptance_and_renoise_equal_transformers(case):
    rng = random.Random(case)
    gen = torch.Generator().manual_seed(case)
    batch, length, vocab = rng.randint(1, 5), rng.randint(1, 40), rng.randint(2, 60)
    logits = _random_logits(gen, rng, batch, length, vocab)
    bound = rng.choice([1e-6, 0.05, 0.1, 0.5, 3.0, 1e3])
    current = torch.randint(0, vocab, (batch, length), generator=gen)
    denoiser = torch.randint(0, vocab, (batch, length), generator=gen)

    reference = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), length, vocab, 48)
    accepted_canvas = reference.accept_canvas(current, denoiser, logits, cur_step=7)
    torch.manual_seed(case)
    renoised = reference.renoise_canvas(accepted_canvas, cur_step=7)

    torch.manual_seed(case)
    noise = torch.randint(0, vocab, (batch, length))
    out = step_reference(
        current,
        denoiser,
        logits.argmax(-1),
        _entropy(logits),
        noise,
        torch.empty(batch, 0, length, dtype=torch.long),
        entropy_bound=bound,
        confidence_threshold=0.01,
    )
    assert torch.equal(out.accepted, reference.accepted_token_mask)
    assert torch.equal(out.canvas, renoised)
    assert bool((out.accepted.sum(-1) >= 1).all()), "at least one position is accepted per row"


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_stopping_statistics_equal_transformers(stability, seed):
    rng = random.Random(seed * 10 + stability)
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = rng.randint(1, 6), rng.randint(1, 20), rng.randint(2, 30)
    threshold = rng.choice([0.005, 0.3, 1.0, 2.5])
    reference = StableAndConfidentStoppingCriteria(stability, threshold)
    history = torch.full((batch, stability, length), -1, dtype=torch.long)
    argmax = torch.randint(0, vocab, (batch, length), generator=gen)
    for _step in range(12):
        keep = torch.rand(batch, generator=gen) < 0.7  # rows keep their argmax canvas, or change
        argmax = torch.where(keep[:, None], argmax, torch.randint(0, vocab, (batch, length), generator=gen))
        logits = torch.randn(batch, length, vocab, generator=gen) * rng.choice([0.1, 3.0, 30.0])
        expected = reference(argmax, logits)
        out = step_reference(
            argmax,
            argmax,
            argmax,
            _entropy(logits),
            argmax,
            history,
            entropy_bound=0.1,
            confidence_threshold=threshold,
        )
        history = out.history
        assert torch.equal(out.stable & out.confident, expected)


def test_a_mean_entropy_equal_to_the_threshold_is_not_confident():
    """Confidence is mean entropy < confidence_threshold, strictly, as transformers' criteria: uniform logits
    over two tokens with the threshold at exactly their entropy do not stop."""
    logits = torch.zeros(1, 4, 2)
    threshold = float(_entropy(logits).mean())
    argmax = logits.argmax(-1)
    none = torch.empty(1, 0, 4, dtype=torch.long)
    out = step_reference(
        argmax,
        argmax,
        argmax,
        _entropy(logits),
        argmax,
        none,
        entropy_bound=0.1,
        confidence_threshold=threshold,
    )
    assert not out.confident.any()
    assert torch.equal(
        out.stable & out.confident, StableAndConfidentStoppingCriteria(0, threshold)(argmax, logits)
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("faith") / "m", canvas_length=16, text_overrides={"sliding_window": 8}
    )


def test_denoising_steps_with_frozen_rows_equal_transformers(tiny_dir):
    """Whole steps, fed identical logits: canvases, argmax canvases, self-conditioning input and stop flags
    equal transformers' `_denoising_step`, including rows frozen after they stop."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir)
    vocab, length, steps, batch = hf.config.text_config.vocab_size, 12, 10, 4
    gen = torch.Generator().manual_seed(3)
    # Rows sharpen at different speeds, so they stop at different steps and are then frozen.
    speed = torch.tensor([0.5, 2.0, 6.0, 20.0])[:, None, None]
    base = torch.randn(batch, length, vocab, generator=gen)
    script = [
        base * speed * (1 + s) + 0.3 * torch.randn(batch, length, vocab, generator=gen) for s in range(steps)
    ]

    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), length, vocab, steps)
    processors = LogitsProcessorList(
        [LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)]
    )
    criteria = StableAndConfidentStoppingCriteria(stability_threshold=1, confidence_threshold=0.5)
    feed = iter(script)
    torch.manual_seed(11)
    current = sampler.initialize_canvas(batch, torch.device("cpu"))
    argmax, sc, finished = current, None, torch.zeros(batch, dtype=torch.bool)
    expected = []
    for cur_step in reversed(range(1, steps + 1)):
        current, argmax, sc, finished = hf._denoising_step(
            decoder_forward=lambda **_: SimpleNamespace(logits=next(feed)),
            current_canvas=current,
            argmax_canvas=argmax,
            input_ids=None,
            decoder_position_ids=None,
            self_conditioning_logits=sc,
            mask_mapping=None,
            **cache_kw(None),
            finished_denoising=finished,
            cur_step=cur_step,
            sampler=sampler,
            logits_processor=processors,
            diffusion_stopping_criteria=criteria,
        )
        expected.append(
            (current.clone(), argmax.clone(), sc.softmax(-1, dtype=torch.float32), finished.clone())
        )
        if finished.all():
            break

    settings = SamplerSettings(
        max_new_tokens=length,
        max_denoising_steps=steps,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.5,
        stability_threshold=1,
        confidence_threshold=0.5,
        canvas_length=length,
        eos_token_ids=(EOS,),
        pad_token_id=0,
    )
    ours = DiffusionSampler(
        ScriptedModel(script),
        settings,
        max_batch=batch,
        max_prompt_tokens=4,
        backend="torch",
        random_mode="torch_global",
    )
    ours._ensure_storage()
    slots = torch.arange(batch)
    torch.manual_seed(11)
    ours._start_canvas(slots)
    stopped = torch.zeros(batch, dtype=torch.bool)
    state = ours._state
    for canvas, arg, probs, done in expected:
        stopped |= ours._denoise(batch, live=~stopped)
        assert torch.equal(state["canvas"][:batch], canvas)
        assert torch.equal(state["argmax"][:batch], arg)
        torch.testing.assert_close(state["soft"][:batch], probs, rtol=0, atol=0)
        assert torch.equal(stopped, done)
    assert int(expected[-1][3].sum()) > 0 and len({int(d.sum()) for *_, d in expected}) > 2, "rows stop apart"


def _reference_completion(row: list[int]) -> list[int]:
    cut = next((i for i, t in enumerate(row) if t == EOS), None)
    return row if cut is None else row[:cut]


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("sharp") / "m",
        canvas_length=16,
        sharpness=20.0,
        text_overrides={"sliding_window": 8},
    )


@pytest.mark.parametrize("stability", [0, 1, 3])
@pytest.mark.parametrize("which", ["flat", "sharp"])
def test_generate_equals_transformers_token_for_token(stability, which, tiny_dir, sharp_dir):
    path = sharp_dir if which == "sharp" else tiny_dir
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    length = hf.config.canvas_length
    batch, prompt_len = 8, 11  # prompts longer than the sliding window (8)
    prompts = torch.randint(
        7, hf.config.text_config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(3)
    )
    knobs = dict(
        max_new_tokens=3 * length,
        max_denoising_steps=10,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=stability,
        confidence_threshold=0.5,
    )
    torch.manual_seed(100 + stability)
    out = hf.generate(
        prompts,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.3),
        eos_token_id=EOS,
        pad_token_id=0,
        **knobs,
    )
    settings = SamplerSettings(
        entropy_bound=0.3, canvas_length=length, eos_token_ids=(EOS,), pad_token_id=0, **knobs
    )
    ours = DiffusionSampler(
        DiffusionGemmaTextModel(hf),
        settings,
        max_batch=batch,
        max_prompt_tokens=16,
        backend="torch",
        random_mode="torch_global",
    )
    torch.manual_seed(100 + stability)
    results = ours.generate([Request(str(i), prompts[i].tolist()) for i in range(batch)], batching="static")

    for i, result in enumerate(results):
        reference = out.sequences[i, prompt_len:].tolist()
        assert result.token_ids == _reference_completion(reference), f"row {i}"
        valid = sum(t != 0 for t in reference)  # transformers' tokens_per_forward = valid tokens / passes
        assert result.denoising_steps == round(valid / out.tokens_per_forward[i].item()), f"row {i}"
    if which == "sharp":  # the cases that make this test meaningful do occur
        assert any(r.denoising_steps < r.canvases * 10 for r in results), "some rows stop early"
        assert any(r.finish_reason == "eos" and len(r.token_ids) % length for r in results), "EOS mid-canvas"
        assert any(r.finish_reason == "eos" for r in results) and any(
            r.finish_reason == "length" for r in results
        )


def test_keyed_mode_step_statistics_agree_with_transformers(tmp_path):
    """Keyed draws change which tokens are drawn, not how the sampler behaves: the number of steps a canvas
    needs has the same distribution as under transformers' global generator.

    Power: 128 prompts, each run once per mode (paired). Measured here: mean ~10.6 steps per canvas, SD ~2.8
    in both modes, per-prompt difference SD ~4.0, so SE ~0.36 steps. Requiring |t| < 3.5 (two-sided alpha
    ~5e-4) still detects a shift of the mean of (3.5 + 0.84) x SE ~1.5 steps (14%) with 80% power. Spreads
    must agree within a factor 1.4 (3.5 sampling SEs of the log-ratio of two 128-sample SDs).
    """
    path = build_checkpoint(tmp_path / "m", canvas_length=16, sharpness=20.0)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    rows, prompt_len = 128, 9
    prompts = torch.randint(
        7, hf.config.text_config.vocab_size, (rows, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    knobs = dict(
        max_new_tokens=16,
        max_denoising_steps=16,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.5,
    )
    torch.manual_seed(0)
    out = hf.generate(
        prompts,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.3),
        eos_token_id=EOS,
        pad_token_id=0,
        **knobs,
    )
    valid = (out.sequences[:, prompt_len:] != 0).sum(-1).float()
    reference = (valid / out.tokens_per_forward).round()
    settings = SamplerSettings(
        entropy_bound=0.3, canvas_length=16, eos_token_ids=(EOS,), pad_token_id=0, **knobs
    )
    ours = DiffusionSampler(
        DiffusionGemmaTextModel(hf), settings, max_batch=16, max_prompt_tokens=16, backend="torch"
    )
    keyed = torch.tensor(
        [
            float(r.denoising_steps)
            for r in ours.generate([Request(f"p{i}", prompts[i].tolist()) for i in range(rows)])
        ]
    )
    assert reference.std() > 1.0, "the workload must have heterogeneous stopping"
    diff = keyed - reference
    t = diff.mean().item() / (diff.std().item() / math.sqrt(rows))
    assert abs(t) < 3.5, f"mean steps differ: keyed {keyed.mean():.2f} vs transformers {reference.mean():.2f}"
    ratio = (keyed.std() / reference.std()).item()
    assert 1 / 1.4 < ratio < 1.4, f"spread differs: SD ratio {ratio:.2f}"
