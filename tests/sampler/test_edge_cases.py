"""Sampler edge cases: canvases shorter than the prompt padding, the padding rows of bucketed steps, drafts
under static batching, the finish reason of an EOS past max_new_tokens, and a stability threshold past
max_denoising_steps."""

from __future__ import annotations

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler, Request
from tests.sampler.test_batching import LENGTH, _settings
from tests.support.models import build_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("edge") / "m", canvas_length=LENGTH, sharpness=12.0)
    return DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())


def _sampler(model, *, batch=1, budget=32, step_graphs="auto", **knobs):
    return DiffusionSampler(
        model,
        _settings(**knobs),
        max_batch=batch,
        max_prompt_tokens=budget,
        backend="torch",
        step_graphs=step_graphs,
    )


def _outputs(results):
    return {r.row_id: (r.token_ids, r.finish_reason, r.canvases) for r in results}


@pytest.mark.parametrize("length", [4, 7])
def test_short_canvases_after_a_prompt_at_the_budget(model, length):
    """An emitted canvas is encoded padded to 16 tokens; for canvases under 8 tokens that padding runs past
    the next canvas's room, which the slot's capacity must hold."""
    rows = [Request("at-budget", list(range(7, 39))), Request("near", list(range(7, 33)))]
    knobs = dict(canvas_length=length, max_new_tokens=3 * length, adaptive_stopping=False, eos_token_ids=())
    continuous = _outputs(_sampler(model, batch=2, **knobs).generate(rows))
    static = _outputs(_sampler(model, batch=2, **knobs).generate(rows, batching="static"))
    assert continuous == static
    assert all(len(tokens) == 3 * length and canvases == 3 for tokens, _, canvases in continuous.values())


def test_padding_rows_of_bucketed_steps_stay_finite_and_leave_no_trace(model):
    """3 rows in 4 slots: slot 3 pads every bucketed step ("eager" runs the CUDA graphs' bucketing on the CPU)
    far past max_denoising_steps; its temperature must stay positive, its numbers finite, and the row that
    takes the slot in the sampler's next call must get the completion it gets alone."""
    knobs = dict(canvas_length=32, max_new_tokens=4 * 32, max_denoising_steps=2, adaptive_stopping=False)
    knobs["eos_token_ids"] = ()
    sampler = _sampler(model, batch=4, step_graphs="eager", **knobs)
    sampler.generate([Request(f"r{i}", [10 + i] * 5) for i in range(3)])
    assert int(sampler._state["step"][3]) > 2 * knobs["max_denoising_steps"]
    assert float(sampler._temperature(sampler._state["step"][3:4])[0]) > 0
    assert torch.isfinite(sampler._state["soft"][3]).all()
    assert all(
        torch.isfinite(k[3]).all() and torch.isfinite(v[3]).all()
        for k, v in zip(sampler._cache.keys, sampler._cache.values, strict=True)
    )
    second = [Request(f"q{i}", [20 + i] * 5) for i in range(4)]
    alone = {r.row_id: _outputs(_sampler(model, **knobs).generate([r]))[r.row_id] for r in second}
    assert _outputs(sampler.generate(second)) == alone


def test_static_batching_records_drafts_only_for_canvases_a_row_ran(model):
    rows = [Request(f"r{i}", [7 + 3 * i] * (1 + 5 * i)) for i in range(4)]
    knobs = dict(record_drafts=True, max_denoising_steps=4, eos_token_ids=(1, 5, 9, 40, 77, 100))
    continuous = _sampler(model, batch=4, **knobs).generate(rows)
    static = _sampler(model, batch=4, **knobs).generate(rows, batching="static")
    assert len({r.canvases for r in static}) > 1, "rows end after different numbers of canvases"
    for c, s in zip(continuous, static, strict=True):
        assert len(s.drafts) == s.canvases and s.drafts == c.drafts


def test_an_eos_past_max_new_tokens_is_a_length_finish(model):
    """max_new_tokens=20 with 16-token canvases: an EOS at position 20 or later lies in the part of the
    second canvas that is cut off, so the completion ended by length."""
    row = Request("r0", [11, 12, 13])
    knobs = dict(max_denoising_steps=4, adaptive_stopping=False)
    full = _sampler(model, max_new_tokens=32, eos_token_ids=(), **knobs).generate([row])[0].token_ids
    late = next(t for t in full[20:] if t not in full[:20])
    early = full[5]
    for batching in ("continuous", "static"):
        cut = _sampler(model, max_new_tokens=20, eos_token_ids=(late,), **knobs).generate(
            [row], batching=batching
        )
        assert (cut[0].token_ids, cut[0].finish_reason) == (full[:20], "length")
        ended = _sampler(model, max_new_tokens=20, eos_token_ids=(early,), **knobs).generate(
            [row], batching=batching
        )
        assert (ended[0].token_ids, ended[0].finish_reason) == (full[: full.index(early)], "eos")


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_each_canvas_starts_its_stability_history_afresh(batching):
    """A model that predicts the same confident canvas at every step: each canvas stops after
    stability_threshold + 1 steps (its first step has no history to be stable against, however alike the
    previous canvas was), or runs max_denoising_steps with adaptive_stopping=False; the last canvas is not
    encoded."""
    from tests.support.models import ScriptedModel

    vocab, length, steps = 40, 8, 6
    peaked = torch.full((1, length, vocab), -30.0)
    peaked[:, torch.arange(length), torch.arange(length) + 10] = 30.0
    for adaptive, per_canvas in ((True, 2), (False, steps)):
        settings = _settings(
            canvas_length=length,
            max_new_tokens=2 * length,
            max_denoising_steps=steps,
            adaptive_stopping=adaptive,
        )
        sampler = DiffusionSampler(
            ScriptedModel([peaked] * 2 * steps), settings, max_batch=1, max_prompt_tokens=4, backend="torch"
        )
        result = sampler.generate([Request("r", [5])], batching=batching)[0]
        assert (result.canvases, result.denoising_steps) == (2, 2 * per_canvas)
        assert sampler.stats.encoder_calls == 2, "the prompt and the first canvas"


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_stability_threshold_past_max_denoising_steps_never_stops_and_takes_no_memory(model, batching):
    """Each slot held an argmax history of stability_threshold canvases: sampler.stability_threshold=10**8 failed
    every worker's start ("the sampler's 8 slots (sampler.batch_size) and their KV cache do not fit ... you
    tried to allocate 204800000000 bytes"), 10**6 took 2 GB and 10 s. A canvas cannot be stable for more steps
    than it runs: such a threshold runs max_denoising_steps every canvas, as adaptive_stopping=false does."""
    rows = [Request(f"r{i}", [7 + i] * 5) for i in range(3)]
    knobs = dict(max_denoising_steps=4, eos_token_ids=())
    huge = _sampler(model, batch=2, stability_threshold=10**12, **knobs)
    got = huge.generate(rows, batching=batching)
    assert huge._state["history"].shape[1] == 4
    off = _sampler(model, batch=2, stability_threshold=4, adaptive_stopping=False, **knobs)
    assert _outputs(got) == _outputs(off.generate(rows, batching=batching))
    assert all(r.denoising_steps == 4 * r.canvases for r in got)
