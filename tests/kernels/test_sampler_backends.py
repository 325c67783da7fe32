"""The sampler on the Triton backend (interpreted on CPU) produces the torch backend's completions."""

from __future__ import annotations

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler, Request
from pipeline.sampler.settings import SamplerSettings
from tests.support.models import build_checkpoint


def test_triton_backend_matches_torch_end_to_end(tmp_path):
    path = build_checkpoint(tmp_path / "m", canvas_length=16, sharpness=12.0)
    model = DiffusionGemmaTextModel(DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())
    settings = SamplerSettings(
        max_new_tokens=32,
        max_denoising_steps=6,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.3,
        stability_threshold=1,
        confidence_threshold=0.3,
        canvas_length=16,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    gen = torch.Generator().manual_seed(0)
    requests = [
        Request(f"r{i}", torch.randint(7, 128, (5 + 3 * i,), generator=gen).tolist()) for i in range(4)
    ]
    outputs = {}
    for backend in ("torch", "triton"):
        sampler = DiffusionSampler(model, settings, max_batch=3, max_prompt_tokens=16, backend=backend)
        assert sampler.backend == backend
        outputs[backend] = [
            (r.token_ids, r.denoising_steps, r.finish_reason) for r in sampler.generate(requests)
        ]
    assert outputs["triton"] == outputs["torch"]
