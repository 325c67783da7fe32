"""Where a decoder step's time goes on the GPU, measured: canvasflow's sampler step at bench_generate's shape
(random bf16 weights, prompts encoded first so that routing and attention see real data), timed with CUDA
events and traced with torch.profiler; the table of operations and kernels by GPU time, next to the roofline
floors of benchmarks/step_profile.py for the same step.

    python benchmarks/profile_step_gpu.py                        # 26B-A4B, batch 32, Triton kernels
    python benchmarks/profile_step_gpu.py --backend torch --batch 8
    python benchmarks/profile_step_gpu.py --shape small --rows 30
    python benchmarks/profile_step_gpu.py --device cpu --shape tiny --backend torch   # smoke run, CPU timer

Needs a CUDA device, torch and transformers (and triton); no Ray, no Hydra. Appends the measured ms per step
and the top rows to results/profile_step_gpu.jsonl; the full table goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, cuda_time, require_cuda, wall_time  # noqa: E402
from benchmarks.step_profile import build_sampler, floor_ms, profile_step  # noqa: E402

RESULTS = str(Path(__file__).resolve().parent / "results" / "profile_step_gpu.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="26b-a4b", choices=["26b-a4b", "small", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--backend", default="triton", choices=["torch", "triton"])
    parser.add_argument("--moe-gemm", default="auto", choices=["auto", "grouped_mm", "triton"])
    parser.add_argument("--rows", type=int, default=40, help="rows of the profiler table (default 40)")
    parser.add_argument("--tflops", type=float, default=724.0)
    parser.add_argument("--bandwidth", type=float, default=4.3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    parser.add_argument("--no-record", action="store_true", help="do not append to the results file")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        require_cuda("profile_step_gpu.py")

    sampler = build_sampler(
        args.shape, args.device, args.batch, args.canvas, args.prompt, args.backend, moe_gemm=args.moe_gemm
    )
    batch, device = args.batch, sampler.device
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, sampler.vocab_size, (batch, args.prompt), generator=gen).tolist()
    slots = torch.arange(batch, device=device)
    sampler._state["k0"][:batch] = torch.arange(batch, device=device)
    sampler._encode(slots, prompts, prefix=True)
    sampler._start_canvas(slots)
    kv_limit = sampler.kv_limit(args.prompt + args.canvas)

    def step() -> None:
        sampler._step(batch, None, kv_limit)

    timing = cuda_time(step, warmup=3, reps=10) if cuda else wall_time(step, warmup=1, reps=3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if not cuda:
        sort_key = "self_cpu_time_total"
    elif hasattr(events[0], "self_device_time_total"):
        sort_key = "self_device_time_total"
    else:  # torch < 2.4
        sort_key = "self_cuda_time_total"
    print(events.table(sort_by=sort_key, row_limit=args.rows))

    model = profile_step(
        args.shape, args.batch, args.canvas, args.prompt, args.backend, moe_gemm=args.moe_gemm
    )
    floor = sum(floor_ms(f, n, args.tflops, args.bandwidth) for _, _, f, n in model.ops)
    flops = sum(f for _, _, f, _ in model.ops)
    measured = timing["median_ms"]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{device_name}: {args.shape}, batch {batch}, {args.backend} kernels: "
        f"{measured:.1f} ms per decoder step (median of {10 if cuda else 3}; q20 {timing['q20_ms']:.1f}, q80 {timing['q80_ms']:.1f});"
        f" roofline floor {floor:.1f} ms; {flops / 1e12:.1f} TFLOP -> {flops / (measured * 1e-3) / 1e12:.0f} TFLOP/s"
    )
    top = sorted(events, key=lambda e: -getattr(e, sort_key))[: args.rows]
    if args.no_record:
        return 0
    append_results(
        RESULTS,
        [
            dict(
                shape=args.shape,
                batch=batch,
                backend=args.backend,
                moe_gemm=args.moe_gemm,
                ms_per_step=measured,
                floor_ms=floor,
                flops=flops,
                top=[(e.key, getattr(e, sort_key) / 3e3, e.count // 3) for e in top],
            )  # fmt: skip
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
