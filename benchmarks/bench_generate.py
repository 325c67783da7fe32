"""Generation throughput: transformers' `generate` vs canvasflow's sampler, same model, same prompts, one run.

    python benchmarks/bench_generate.py                    # DiffusionGemma-26B-A4B text shape, random bf16
    python benchmarks/bench_generate.py --shape small      # a small shape for quick runs
    python benchmarks/bench_generate.py --shape tiny --device cpu --batches 1 4 --canvas 32   # CPU smoke run
    python benchmarks/bench_generate.py --family llada     # LLaDA-8B shape: exact path vs prefix/dual caches
    python benchmarks/bench_generate.py --family llada --shape tiny --device cpu --batches 4 --canvas 32 --block 8

Workload (the issue's): prompt 128 tokens, one 256-token canvas, 16 denoising steps with adaptive stopping off
(fixed step count), at growing batch sizes until each side runs out of memory. Each batch runs once to warm up
(allocations, Triton compiles, cuBLAS heuristics; for canvasflow its CUDA graphs, captured once per sampler
as in the pipeline's actors) and once timed, end to end (prompt encoding included). canvasflow runs with the
pipeline's continuous batching (`--batching static`: the reference's schedule, eager steps). Then an adaptive
run on a workload with heterogeneous stopping (benchmarks/generate_adaptive.py): static vs continuous
batching, decoder row-passes per generated token. Prints tokens/s, ms per step, model FLOP utilisation
against the device's measured bf16 matmul rate, peak memory and the ratios; appends each result, as soon as
it is measured, to benchmarks/results/generate.jsonl (device, commit, date). `--budget-s` ends the sweep
before a batch that would not fit the time left. Needs only torch, triton and transformers (no Ray, no
Hydra).

With `--family llada|dream` it measures the mask-diffusion sampler instead (benchmarks/generate_mask.py):
forward FLOPs saved and speed-up of the prefix and dual block caches over the exact path, at `--shape`
26b-a4b (meaning the family's published full shape: LLaDA-8B, Dream-7B), small or tiny.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, matmul_tflops  # noqa: E402
from pipeline.sampler.engine import Request  # noqa: E402

RESULTS = str(Path(__file__).resolve().parent / "results" / "generate.jsonl")
LAYERS_26B = (["sliding_attention"] * 5 + ["full_attention"]) * 5
SHAPES = {
    # google/diffusiongemma-26B-A4B-it text model (public config.json)
    "26b-a4b": dict(
        vocab_size=262_144,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        sliding_window=1024,
        layer_types=LAYERS_26B,
        max_position_embeddings=131_072,
    ),
    "small": dict(
        vocab_size=65_536,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=2,
        head_dim=128,
        global_head_dim=256,
        num_experts=32,
        top_k_experts=4,
        moe_intermediate_size=512,
        sliding_window=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        max_position_embeddings=8192,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=64,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048,
    ),
}
VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    position_embedding_size=64,
)


def build_model(shape: str, device: str, dtype: torch.dtype, canvas: int):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(
        text_config=dict(SHAPES[shape]), vision_config=dict(VISION), canvas_length=canvas
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def active_params(model) -> tuple[int, int]:
    """(non-embedding parameters active per token, embedding parameters)."""
    text = model.config.text_config
    total = expert = 0
    for name, p in model.model.decoder.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    active = total - expert + expert * text.top_k_experts // text.num_experts
    return active, model.model.decoder.embed_tokens.weight.numel()


def step_flops(model, batch: int, canvas: int, prompt: int) -> float:
    """Model FLOPs of one denoising step: 2 x active params per canvas token, attention over prefix + canvas,
    and the two vocabulary products (logits, self-conditioning)."""
    text = model.config.text_config
    active, embedding = active_params(model)
    tokens = batch * canvas
    attention = sum(
        4 * tokens * (prompt + canvas) * text.num_attention_heads * layer.self_attn.head_dim
        for layer in model.model.decoder.layers
    )
    return 2 * active * tokens + attention + 2 * 2 * tokens * embedding


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return out, time.perf_counter() - start, peak


def run_transformers(model, prompts, steps: int) -> int:
    """transformers' generate with a fixed step count; returns the completion tokens."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    canvas = model.config.canvas_length
    # confidence_threshold ~0 means "never confident": a fixed number of steps, as the reference counts them.
    out = model.generate(
        prompts,
        max_new_tokens=canvas,
        max_denoising_steps=steps,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=1e-30,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        eos_token_id=1,
        pad_token_id=0,
    )
    return int((out.sequences[:, prompts.shape[1] :] != 0).sum().item())


def canvasflow_sampler(native, args, slots: int, *, adaptive: bool, eos=(1,), canvases: int = 1):
    """canvasflow's sampler as the pipeline's actors hold it: built once, reused for every batch (so its
    CUDA graphs are captured once, by the warm-up run)."""
    from pipeline.sampler.engine import DiffusionSampler
    from pipeline.sampler.settings import SamplerSettings

    canvas = native.canvas_length
    settings = SamplerSettings(
        max_new_tokens=canvas * canvases,
        max_denoising_steps=args.steps,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.1,
        stability_threshold=1,
        confidence_threshold=0.5,
        canvas_length=canvas,
        eos_token_ids=tuple(eos),
        pad_token_id=0,
        adaptive_stopping=adaptive,
    )
    return DiffusionSampler(
        native, settings, max_batch=slots, max_prompt_tokens=args.prompt, backend=args.backend
    )


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="26b-a4b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="default 1 8 16 32 48 64 128 256 (mask: 1 8 32)"
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--canvas", type=int, default=None, help="new tokens (default 256; mask: 128)")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default 16; mask families: canvas / 2)"
    )
    parser.add_argument("--family", default="diffusiongemma", choices=["diffusiongemma", "llada", "dream"])
    parser.add_argument("--block", type=int, default=32, help="block_length of the mask families")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument(
        "--moe-gemm",
        default="auto",
        choices=["auto", "grouped_mm", "triton"],
        help="the experts' products on the Triton backend (default auto: Triton's grouped GEMM)",
    )
    parser.add_argument(
        "--batching",
        default="continuous",
        choices=["continuous", "static"],
        help="canvasflow's batching in the fixed-step runs (default continuous, the pipeline's: CUDA graphs)",
    )
    parser.add_argument(
        "--adaptive-rows", type=int, default=64, help="rows of the adaptive workload (0: skip)"
    )
    parser.add_argument(
        "--adaptive-canvases", type=int, default=4, help="most canvases per row of the adaptive workload"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop the batch sweep before a batch whose predicted time would leave less than "
        "--reserve-s of this budget (the adaptive run comes after)",
    )
    parser.add_argument("--reserve-s", type=float, default=60.0, help="seconds kept for the adaptive run")
    parser.add_argument("--no-record", action="store_true", help="print only; append nothing to the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_generate.py: --device cuda but no CUDA device is visible; nothing was measured.")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rate = matmul_tflops() if args.device == "cuda" else None
    record = (lambda rows: None) if args.no_record else (lambda rows: append_results(RESULTS, rows))
    if args.family != "diffusiongemma":
        from benchmarks.generate_mask import run_mask_bench

        args.batches = args.batches or [1, 8, 32]
        args.canvas = args.canvas or 128
        record(run_mask_bench(args, rate))
        return 0
    args.steps = args.steps or 16
    args.batches = args.batches or [1, 8, 16, 32, 48, 64, 128, 256]
    args.canvas = args.canvas or 256
    started = time.perf_counter()
    model = build_model(args.shape, args.device, dtype, args.canvas)
    from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel

    native = DiffusionGemmaTextModel(model, moe_gemm=args.moe_gemm)
    print(
        f"model {args.shape} on {args.device}: built in {time.perf_counter() - started:.1f}s; "
        f"matmul rate {rate and round(rate)} TFLOP/s; canvasflow batching {args.batching}, experts {args.moe_gemm}",
        flush=True,
    )
    best = sweep(model, native, args, rate, record, started)
    if best.get("transformers"):
        print(
            f"best batch: canvasflow {best.get('canvasflow', 0):.1f} tok/s vs transformers "
            f"{best['transformers']:.1f} tok/s: {best.get('canvasflow', 0) / best['transformers']:.2f}x"
        )
    if args.adaptive_rows:
        from benchmarks.generate_adaptive import run_adaptive

        def make(slots, **knobs):
            return canvasflow_sampler(native, args, slots, **knobs)

        record(run_adaptive(model, native, args, make, timed, log=lambda line: print(line, flush=True)))
    print(
        f"total {time.perf_counter() - started:.0f}s" + ("" if args.no_record else f"; results in {RESULTS}")
    )
    return 0


def sweep(model, native, args, rate, record, started: float) -> dict[str, float]:
    """The fixed-step runs at growing batch sizes, each implementation until it runs out of memory; every
    batch warms up once (allocations, Triton compiles, canvasflow's CUDA graph) before the timed run. Each
    row is recorded as soon as it is measured. Returns the best tokens/s of each implementation."""
    vocab = model.config.text_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(f"{'impl':<12}{'batch':>6}{'tok/s':>10}{'ms/step':>10}{'MFU %':>8}{'peak GiB':>10}{'vs HF':>8}")
    best: dict[str, float] = {}
    alive = {"transformers": True, "canvasflow": True}
    last: tuple[int, float] | None = None  # (batch, seconds both implementations took at it)
    for batch in args.batches:
        if args.budget_s is not None and last is not None:
            predicted = last[1] * batch / last[0]
            if time.perf_counter() - started + predicted > args.budget_s - args.reserve_s:
                print(f"budget: batch {batch} would take about {predicted:.0f}s more; the sweep stops here")
                break
        batch_started = time.perf_counter()
        prompts = torch.randint(3, vocab, (batch, args.prompt), generator=gen).to(args.device)
        flops = step_flops(model, batch, args.canvas, args.prompt)
        row: dict[str, float] = {}
        for impl in ("transformers", "canvasflow"):
            if not alive[impl]:
                continue
            sampler = None
            try:
                if impl == "transformers":
                    fn = lambda p=prompts: run_transformers(model, p, args.steps)  # noqa: E731
                else:
                    sampler = canvasflow_sampler(native, args, batch, adaptive=False)
                    requests = [Request(f"r{i}", r.tolist()) for i, r in enumerate(prompts.cpu())]
                    fn = lambda s=sampler, q=requests: s.generate(q, batching=args.batching)  # noqa: E731
                fn()  # warm-up
                _, wall, peak = timed(fn, args.device)
            except Exception as e:  # noqa: BLE001 - out of memory ends this implementation's sweep
                if not is_oom(e):
                    raise
                alive[impl] = False
                print(f"{impl:<12}{batch:>6}  out of memory", flush=True)
                continue
            finally:
                fn = sampler = None  # the sampler's KV cache and graphs go before the next batch
                gc.collect()
                torch.cuda.empty_cache() if args.device == "cuda" else None
            ms_step = wall * 1e3 / args.steps
            tok_s = batch * args.canvas / wall
            mfu = 100 * flops / (ms_step * 1e-3) / (rate * 1e12) if rate else None
            row[impl] = tok_s
            ratio = tok_s / row["transformers"] if "transformers" in row and impl == "canvasflow" else None
            print(
                f"{impl:<12}{batch:>6}{tok_s:>10.1f}{ms_step:>10.1f}{mfu or 0:>8.1f}{peak / 2**30:>10.2f}"
                f"{ratio or 0:>8.2f}",
                flush=True,
            )
            best[impl] = max(best.get(impl, 0), tok_s)
            record(
                [
                    {
                        "bench": "generate",
                        "shape": args.shape,
                        "impl": impl,
                        "batch": batch,
                        "steps": args.steps,
                        "prompt": args.prompt,
                        "canvas": args.canvas,
                        "adaptive": False,
                        "batching": args.batching if impl == "canvasflow" else None,
                        "moe_gemm": args.moe_gemm if impl == "canvasflow" else None,
                        "tokens_per_s": tok_s,
                        "ms_per_step": ms_step,
                        "mfu_percent": mfu,
                        "peak_gib": peak / 2**30,
                        "matmul_tflops": rate,
                        "vs_transformers": ratio,
                    }
                ]
            )
        if not row:
            break
        last = (batch, time.perf_counter() - batch_started)
    return best


if __name__ == "__main__":
    sys.exit(main())
