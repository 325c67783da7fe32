"""The sampler on the Triton backend (interpreted on CPU) produces the torch backend's completions."""

from __future__ import annotations

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.settings import SamplerSettings
from tests.support.models import build_checkpoint

# Two layers, one of each kind: a sliding one whose window (8) is shorter than the prefix, and a global one.
# That is every kernel of the forward and the chain of fused norms (a layer's tail computes the next one's
# input norm, the last one's the final norm). A canvas of 10, not a power of two, so that the step kernel's
# padded tail is used; prompts of 5 to 14 tokens. With sharpness 16 its rows stop early (7 to 9 steps for
# up to four canvases); one meets EOS in its third canvas, three are cut at max_new_tokens in the fourth
# (with build_checkpoint's random norm scales, sharpness 12 ended every row by length). The four-layer model
# with a canvas of 16 and the default window of 64 that this test used ran every canvas to
# max_denoising_steps, ended every row by length and never reached the window, at three times the
# interpreted work (85 s).
TWO_LAYERS = {
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 8,
}


def test_triton_backend_matches_torch_end_to_end(tmp_path):
    path = build_checkpoint(tmp_path / "m", canvas_length=10, sharpness=16.0, text_overrides=TWO_LAYERS)
    model = DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())
    settings = SamplerSettings(
        max_new_tokens=32,
        max_denoising_steps=6,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.3,
        stability_threshold=1,
        confidence_threshold=0.3,
        canvas_length=10,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    gen = torch.Generator().manual_seed(0)
    # Four prompts of odd lengths in three slots: a row finishing frees its slot for the queued one.
    requests = [
        Request(f"r{i}", torch.randint(7, 128, (5 + 3 * i,), generator=gen).tolist()) for i in range(4)
    ]
    outputs = {}
    for backend in ("torch", "triton"):
        sampler = DiffusionSampler(model, settings, max_batch=3, max_prompt_tokens=16, backend=backend)
        assert sampler.backend == backend
        outputs[backend] = [
            (r.token_ids, r.denoising_steps, r.finish_reason, r.canvases) for r in sampler.generate(requests)
        ]
    assert outputs["triton"] == outputs["torch"]
    # What the comparison covers: canvases stopped early (adaptive stopping), second canvases (the first one
    # encoded after the prompt), rows ended by EOS and by max_new_tokens.
    runs = outputs["torch"]
    assert any(steps < canvases * settings.max_denoising_steps for _, steps, _, canvases in runs), runs
    assert max(canvases for *_, canvases in runs) > 1, runs
    assert {reason for _, _, reason, _ in runs} == {"eos", "length"}, runs
