"""The decoder step makes no host synchronisation (what CUDA-graph capture needs), checked without a GPU: the
step runs on meta tensors, where anything that reads a value back (.item(), .tolist(), bool(tensor), nonzero,
data-dependent shapes) raises. The Triton launches are recorded, not run. The 26B-A4B shape costs no memory
on meta; it takes the grouped-GEMM expert path, which is the GPU's."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_generate import build_model
from pipeline.kernels.aot import recording_all
from pipeline.kernels.vocab_head import triton_head
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
from pipeline.sampler.engine import DiffusionSampler
from pipeline.sampler.settings import SamplerSettings


def _sampler(backend: str, batch: int, moe_gemm: str = "auto") -> DiffusionSampler:
    hf = build_model("26b-a4b", "meta", torch.bfloat16, 256)
    model = DiffusionGemmaTextModel(hf, backend=backend, moe_gemm=moe_gemm)
    settings = SamplerSettings(
        max_new_tokens=512, max_denoising_steps=16, t_min=0.4, t_max=0.8, entropy_bound=0.1,
        stability_threshold=2, confidence_threshold=0.5, canvas_length=256, eos_token_ids=(1,), pad_token_id=0,
    )  # fmt: skip
    return DiffusionSampler(model, settings, max_batch=batch, max_prompt_tokens=128, backend=backend)


def test_meta_tensors_refuse_host_reads():
    """The premise: a value read on meta raises, so a step that runs there reads nothing back."""
    x = torch.zeros(4, device="meta")
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.nonzero(), lambda: x.tolist()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize(
    "backend, moe_gemm", [("torch", "auto"), ("triton", "grouped_mm"), ("triton", "auto")]
)
def test_decoder_step_has_no_host_synchronisation(backend, moe_gemm):
    sampler = _sampler(backend, batch=4, moe_gemm=moe_gemm)
    sampler._ensure_storage()
    with recording_all() as calls:
        stop = sampler._step(4, None, sampler.capacity)
    assert stop.shape == (4,) and stop.dtype == torch.bool
    launched = [name for name, _, _ in calls]
    layers = 30
    if backend == "triton":  # every fused kernel is on the step's path: once a step, or once a layer
        chunks = 262_144 // triton_head._default_vocab_chunk(4 * 256)
        assert launched.count("_head_chunk_kernel") == chunks and launched.count("_step_kernel") == 1
        for name in (
            "_attention_tail_kernel",
            "_ffn_tail_kernel",
            "_canvas_attention_kernel",
            "_combine_kernel",
        ):
            assert launched.count(name) == layers, name
        assert launched.count("_head_kernel") == 3 * layers + 1  # q, k and v norms; the first input norm
        if moe_gemm == "grouped_mm":  # torch._grouped_mm products, gelu x up apart
            assert launched.count("_gelu_mul_kernel") == 2 * layers  # dense MLP and experts
            assert "_expert_gemm_kernel" not in launched
        else:  # the experts' gelu x up inside their gate/up GEMM
            assert launched.count("_gelu_mul_kernel") == layers  # the dense MLP's
            assert launched.count("_expert_gemm_kernel") == 2 * layers  # gate/up and down
    else:
        assert not launched
