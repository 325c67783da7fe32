"""Static vs continuous batching on a workload whose rows need different numbers of steps and canvases.

The reference (and `sampler.batching=static`) runs every row of a batch until its slowest row finishes,
canvas after canvas; continuous batching lets a finished row leave its slot at once. Both must give the same
completions (keyed randomness); this script checks that, and reports decoder row-steps computed, wall time and
tokens/s for each, plus the workload's heterogeneity.

    python benchmarks/bench_batching.py                # CPU-sized defaults, ~1-2 minutes
    python benchmarks/bench_batching.py --rows 512 --batch 32 --device cuda

The model is a random DiffusionGemma-architecture checkpoint built from a small config, with its final norm
scaled ("sharpness") so that predictions are confident enough for rows to stop early and emit EOS at varied
points, as a trained model's do. Results are appended to benchmarks/results/batching.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, positive_int  # noqa: E402
from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel  # noqa: E402
from pipeline.models.tiny import build_tiny_model  # noqa: E402
from pipeline.sampler.engine import DiffusionSampler, Request  # noqa: E402
from pipeline.sampler.settings import SamplerSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "batching.jsonl"
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "head_dim": 64,
    "global_head_dim": 64,
    "moe_intermediate_size": 128,
    "sliding_window": 128,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}


def build_model(cache: Path, sharpness: float, device: str, dtype: torch.dtype) -> DiffusionGemmaTextModel:
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = cache / f"bench-batching-s{sharpness:g}"
    if not (path / "config.json").exists():
        build_tiny_model(path, seed=1, canvas_length=32, text_overrides=MODEL_SHAPE)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path)
        with torch.no_grad():
            model.model.decoder.norm.weight.mul_(sharpness)
        model.save_pretrained(path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
    return DiffusionGemmaTextModel(model).to(device)


def workload(rows: int, vocab: int, seed: int) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        length = int(torch.randint(4, 48, (1,), generator=gen))
        out.append(Request(f"row-{i}", torch.randint(7, vocab, (length,), generator=gen).tolist()))
    return out


def run(model, settings, requests, batch: int, mode: str) -> dict:
    sampler = DiffusionSampler(model, settings, max_batch=batch, max_prompt_tokens=48, backend="auto")
    sampler.generate(requests[: batch * 2], batching=mode)  # warm-up: allocations, kernel choices
    sampler.stats = type(sampler.stats)()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = sampler.generate(requests, batching=mode)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "mode": mode,
        "row_steps": sampler.stats.decoder_row_steps,
        "decoder_calls": sampler.stats.decoder_calls,
        "encoder_calls": sampler.stats.encoder_calls,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "outputs": {r.row_id: (r.token_ids, r.denoising_steps) for r in results},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=192)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--canvases", type=positive_int, default=4, help="max_new_tokens in canvases of 32")
    parser.add_argument("--steps", type=positive_int, default=24, help="max_denoising_steps")
    parser.add_argument("--sharpness", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "canvasflow" / "bench")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.cache, args.sharpness, args.device, dtype)
    settings = SamplerSettings(
        max_new_tokens=32 * args.canvases,
        max_denoising_steps=args.steps,
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.1,
        stability_threshold=1,
        confidence_threshold=0.5,
        canvas_length=32,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    requests = workload(args.rows, model.vocab_size, seed=0)
    static = run(model, settings, requests, args.batch, "static")
    continuous = run(model, settings, requests, args.batch, "continuous")
    identical = static["outputs"] == continuous["outputs"]

    results = continuous["results"]
    canvases = [r.canvases for r in results]
    per_canvas = [r.denoising_steps / r.canvases for r in results]
    reasons = {k: sum(r.finish_reason == k for r in results) for k in ("eos", "length")}
    print(
        f"workload: {args.rows} rows, batch {args.batch}, up to {args.canvases} canvases x {args.steps} steps; "
        f"canvases/row {statistics.mean(canvases):.2f} (min {min(canvases)}, max {max(canvases)}), "
        f"steps/canvas {statistics.mean(per_canvas):.1f} +- {statistics.pstdev(per_canvas):.1f}, "
        f"finish {reasons}"
    )
    print(f"{'mode':<12}{'row-steps':>11}{'decoder calls':>15}{'wall s':>9}{'tokens/s':>10}")
    for r in (static, continuous):
        print(
            f"{r['mode']:<12}{r['row_steps']:>11}{r['decoder_calls']:>15}{r['wall_s']:>9.2f}"
            f"{r['tokens_per_s']:>10.1f}"
        )
    ratio_steps = static["row_steps"] / continuous["row_steps"]
    speedup = static["wall_s"] / continuous["wall_s"]
    print(
        f"continuous computes {ratio_steps:.2f}x fewer row-steps and is {speedup:.2f}x faster; "
        f"completions identical: {identical}"
    )
    records = [
        {
            "bench": "batching",
            "device_arg": args.device,
            "rows": args.rows,
            "batch": args.batch,
            "canvases": args.canvases,
            "steps": args.steps,
            "sharpness": args.sharpness,
            "threads": torch.get_num_threads(),
            **{k: v for k, v in r.items() if k not in ("outputs", "results")},
        }
        for r in (static, continuous)
    ]
    records.append(
        {
            "bench": "batching-summary",
            "row_step_ratio": ratio_steps,
            "speedup": speedup,
            "identical": identical,
        }
    )
    append_results(str(RESULTS), records)
    if not identical:
        sys.exit("static and continuous batching gave different completions")


if __name__ == "__main__":
    main()
