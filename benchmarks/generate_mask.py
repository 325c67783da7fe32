"""The mask-diffusion part of bench_generate.py (`--family llada|dream`): canvasflow's mask sampler with the
exact path (cache=none: the whole sequence every step, as LLaDA's `generate` and Dream's `diffusion_generate`
run) against Fast-dLLM's prefix and dual block caches, on one randomly initialised model in a published shape,
at growing batch sizes.

Per cache mode: generated tokens/s, forward passes per row, forward FLOPs computed (dense products, attention,
vocabulary head) and the fraction saved against the exact path, wall-clock speed-up, peak memory, and the rows
whose completion equals the exact path's. Random weights make the commit order arbitrary, so "same" here only
shows the caches are approximations; their accuracy on a trained model is what benchmarks/bench_mask_cache.py
measures. Each family decodes with its own algorithm: LLaDA's `generate` (low_confidence, temperature 0) or
Dream's `diffusion_generate` with the sampling its model card recommends (entropy, temperature 0.2, top_p 0.95:
a sort of every position's logits). Both run a fixed number of steps per block, so FLOPs depend on the shapes
only. Needs only torch (no Ray, no Hydra, no transformers).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from pipeline.models.bidirectional import BidirectionalLM, MaskLMSpec, rope_inv_freq
from pipeline.sampler.engine import Request
from pipeline.sampler.mask.engine import MaskDiffusionSampler
from pipeline.sampler.mask.settings import MaskSettings

# Published configs: GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B (Qwen2-7B body).
MASK_SHAPES: dict[str, dict[str, Any]] = {
    "llada-8b": dict(
        family="llada", vocab_size=126_464, hidden_size=4096, intermediate_size=12_288, num_layers=32,
        num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=500_000.0, qkv_bias=False,
        tie_embeddings=False, mask_token_id=126_336, shift_logits=False, context_window=4096,
    ),
    "dream-7b": dict(
        family="dream", vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28,
        num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=False, mask_token_id=151_666, shift_logits=True, context_window=4096,
    ),
}  # fmt: skip
# Each family's own decoding: LLaDA's defaults; Dream's model-card sampling (alg="entropy", temperature 0.2, top_p 0.95).
RULES: dict[str, dict[str, Any]] = {
    "llada": dict(remasking="low_confidence", temperature=0.0),
    "dream": dict(remasking="entropy", temperature=0.2, top_p=0.95),
}
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16)
TINY = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
    mask_token_id=4000,
)  # fmt: skip


def mask_spec(family: str, shape: str) -> MaskLMSpec:
    """`shape`: "full" (the published 8B/7B shape), "small" or "tiny" (same family conventions)."""
    values = dict(MASK_SHAPES["llada-8b" if family == "llada" else "dream-7b"])
    if shape == "small":
        values.update(SMALL, num_kv_heads=16 if family == "llada" else 4)  # Dream keeps its grouped KV heads
    elif shape == "tiny":
        values.update(TINY)
    elif shape != "full":
        raise ValueError(f"mask shape {shape!r} is not one of full, small, tiny")
    return MaskLMSpec(**values)


def random_model(spec: MaskLMSpec, device: str, dtype: torch.dtype, seed: int = 0) -> BidirectionalLM:
    """Normal(0, 0.02) weights drawn on the device (an 8B model in seconds), unit norms."""
    with torch.device("meta"):
        model = BidirectionalLM(spec)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.register_buffer("inv_freq", rope_inv_freq(spec, device), persistent=False)
    return model.eval().requires_grad_(False)


def _run(model: BidirectionalLM, settings: MaskSettings, prompts: list[list[int]], device: str) -> dict:
    sampler = MaskDiffusionSampler(model, settings, max_batch=len(prompts), max_prompt_tokens=len(prompts[0]))
    requests = [Request(f"row-{i}", p) for i, p in enumerate(prompts)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = sampler.generate(requests, batching="static")
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "tokens": [r.token_ids for r in results],
        "generated": len(prompts) * settings.max_new_tokens,
        "passes_per_row": sum(r.denoising_steps for r in results) / len(results),
        "flops": sampler.stats.flops(model),
        "wall_s": wall,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
    }


def run_mask_bench(args: Any, rate: float | None) -> list[dict]:
    """Prints the table and returns the records (bench_generate.py appends them with the others)."""
    shape = {"26b-a4b": "full"}.get(args.shape, args.shape)
    spec = mask_spec(args.family, shape)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    model = random_model(spec, args.device, dtype)
    gen_length = args.canvas
    steps = args.steps or gen_length // 2
    print(
        f"{args.family} {shape} shape ({spec.num_layers} layers, hidden {spec.hidden_size}, vocab "
        f"{spec.vocab_size}) on {args.device}, random {dtype}: built in {time.perf_counter() - started:.1f}s; "
        f"prompt {args.prompt}, {gen_length} new tokens in blocks of {args.block}, {steps} steps, "
        f"{args.family}'s algorithm ({', '.join(f'{k} {v}' for k, v in RULES[args.family].items())})"
    )
    print(
        f"{'cache':<8}{'batch':>6}{'tok/s':>10}{'passes':>8}{'GFLOP':>11}{'saved':>8}{'MFU %':>7}"
        f"{'wall s':>8}{'speed-up':>9}{'peak GiB':>9}{'same':>6}"
    )
    gen = torch.Generator().manual_seed(0)
    eos = spec.vocab_size - 1  # an id a random model commits about once in vocab_size positions
    records = []
    for batch in args.batches:
        prompts = torch.randint(3, spec.mask_token_id, (batch, args.prompt), generator=gen).tolist()
        exact = None
        for cache in ("none", "prefix", "dual"):
            settings = MaskSettings(
                max_new_tokens=gen_length, steps=steps, block_length=args.block, mask_token_id=spec.mask_token_id,
                eos_token_ids=(eos,), pad_token_id=eos, cache=cache, algorithm=args.family, **RULES[args.family],
            )  # fmt: skip
            try:
                if batch == args.batches[0]:
                    _run(model, settings, prompts[:1], args.device)  # warm-up: allocations, kernel selection
                out = _run(model, settings, prompts, args.device)
            except torch.OutOfMemoryError:
                print(f"{cache:<8}{batch:>6}  out of memory")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            exact = exact or out
            same = sum(a == b for a, b in zip(out["tokens"], exact["tokens"], strict=True)) / batch
            saved = 1 - out["flops"] / exact["flops"]
            speedup = exact["wall_s"] / out["wall_s"]
            mfu = 100 * out["flops"] / out["wall_s"] / (rate * 1e12) if rate else None
            tok_s = out["generated"] / out["wall_s"]
            print(
                f"{cache:<8}{batch:>6}{tok_s:>10.1f}{out['passes_per_row']:>8.1f}{out['flops'] / 1e9:>11.1f}"
                f"{saved:>8.1%}{mfu or 0:>7.1f}{out['wall_s']:>8.2f}{speedup:>8.2f}x{out['peak_gib']:>9.2f}"
                f"{same:>6.0%}"
            )
            records.append(
                {
                    "bench": "generate-mask",
                    "family": args.family,
                    "algorithm": settings.algorithm,
                    "remasking": settings.remasking,
                    "shape": shape,
                    "cache": cache,
                    "batch": batch,
                    "prompt": args.prompt,
                    "gen_length": gen_length,
                    "block_length": args.block,
                    "steps": steps,
                    "tokens_per_s": tok_s,
                    "passes_per_row": out["passes_per_row"],
                    "forward_flops": out["flops"],
                    "flops_saved": saved,
                    "wall_s": out["wall_s"],
                    "speedup": speedup,
                    "mfu_percent": mfu,
                    "peak_gib": out["peak_gib"],
                    "matmul_tflops": rate,
                    "same_as_exact": same,
                }
            )
    return records
