"""Mixture-of-experts layer benchmark at DiffusionGemma-26B-A4B's expert shape (128 experts, top-8, hidden
2,816, expert intermediate 704, bf16), N tokens per step (256 canvas positions a row: batch 8 = 2,048).

Paths, each the whole expert layer from routed tokens to their combined outputs:
  transformers  DiffusionGemmaTextExperts' own forward, with its grouped_mm experts implementation on CUDA (its
                fastest; eager on the CPU)
  grouped_mm    canvasflow's grouped path: rows gathered (index_select), torch._grouped_mm products, the fused
                gelu x up and combination kernels
  triton        canvasflow's grouped path on its Triton grouped GEMM: rows read through the token index and
                gelu x up fused into the gate/up product (kernels/experts/triton_gemm.py)

Reports the median time by CUDA events (20% / 80% quantiles), TFLOP/s of the expert products (2 x N x k x
3 x D x I) against the device's measured bf16 matmul rate, and the speed-up over grouped_mm; appends one JSON
line per result to benchmarks/results/experts.jsonl. `--choice FILE` writes the faster canvasflow path at
the largest N (grouped_mm or triton) for bench_generate.py --moe-gemm (gpu_checks.sh uses it). Then, on a GPU,
each product alone at the largest N: torch's (gather + torch._grouped_mm) against the Triton GEMM at a few
tile sizes (triton_gemm.TILE_CANDIDATES), to choose launch_params from measurements. Needs torch,
triton and transformers:  python benchmarks/bench_experts.py [--quick]
A smoke run on the CPU (tiny shapes, Triton's interpreter, wall-clock timing, nothing recorded):
  python benchmarks/bench_experts.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's `pipeline` and `benchmarks`, installed or not

import torch  # noqa: E402

from benchmarks.bench_generate import SHAPES  # noqa: E402
from benchmarks.common import (  # noqa: E402
    append_results,
    cuda_time,
    environment,
    matmul_tflops,
    require_cuda,
    wall_time,
)
from pipeline.models.moe import moe_forward  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "experts.jsonl")
PATHS = ("transformers", "grouped_mm", "triton")


def build_experts(shape: str, device: str, dtype: torch.dtype):
    """transformers' expert module of `shape` with random weights scaled to keep activations O(1)."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    config = DiffusionGemmaTextConfig(**SHAPES[shape])
    config._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    with torch.device(device):
        experts = DiffusionGemmaTextExperts(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.normal_(0.0, weight.shape[2] ** -0.5, generator=gen)
    return experts, int(config.top_k_experts)


def routed_tokens(num: int, experts, top_k: int, device: str, dtype: torch.dtype):
    """Hidden states [N, D] and a random top-k routing with softmax weights, as a router would give."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(num, experts.hidden_dim, device=device, generator=gen).to(dtype)
    logits = torch.randn(num, experts.num_experts, device=device, generator=gen)
    weights, index = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    return x, index, weights / weights.sum(dim=-1, keepdim=True)


def run(path: str, experts, x, index, weights):
    if path == "transformers":
        return experts(x, index, weights)
    return moe_forward(experts, x, index, weights, path="grouped", backend="triton", gemm=path)


def sweep_products(experts, x, index, timer, rate) -> list[dict]:
    """Each of the two expert products alone at one N: torch's (row gather, torch._grouped_mm, and gelu x up
    for the first) against the Triton grouped GEMM at each tile candidate. Prints a table; returns rows."""
    from pipeline.kernels import experts as expert_kernels  # Triton imported after main() set the interpreter
    from pipeline.kernels.experts.triton_gemm import TILE_CANDIDATES, expert_gemm_triton

    top_k = index.shape[1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // top_k
    offsets = torch.cumsum(torch.bincount(flat, minlength=experts.num_experts), 0, dtype=torch.int32)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    hidden = expert_gemm_triton(x, rows, gate_up, offsets, gelu=True)

    def torch_gate_up():
        product = torch._grouped_mm(x.index_select(0, rows), gate_up.transpose(1, 2), offs=offsets)
        return expert_kernels.gelu_mul(*product.chunk(2, dim=-1), backend="triton")

    products = {
        "gate_up+gelu": (
            torch_gate_up,
            lambda t: expert_gemm_triton(x, rows, gate_up, offsets, gelu=True, tiles=t),
        ),
        "down": (
            lambda: torch._grouped_mm(hidden, down.transpose(1, 2), offs=offsets),
            lambda t: expert_gemm_triton(hidden, None, down, offsets, gelu=False, tiles=t),
        ),
    }
    print(f"\nthe products alone, N={x.shape[0]} ({rows.numel()} rows):")
    print(f"{'product':<14} {'impl':<26} {'median ms':>10} {'TFLOP/s':>8} {'of mm':>6} {'vs torch':>9}")
    out = []
    for product, (torch_fn, triton_fn) in products.items():
        weight = gate_up if product.startswith("gate") else down
        flops = 2 * rows.numel() * weight.shape[1] * weight.shape[2]
        impls = {"torch (gather + grouped_mm)": torch_fn}
        impls.update(
            {f"triton {name}": (lambda t=t, f=triton_fn: f(t)) for name, t in TILE_CANDIDATES.items()}
        )
        base = None
        for impl, fn in impls.items():
            try:
                with torch.no_grad():
                    ms = timer(fn)["median_ms"]
            except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is reported, not fatal
                print(f"{product:<14} {impl:<26} failed: {str(e).splitlines()[0][:80]}")
                continue
            base = base or ms
            tflops = flops / (ms * 1e-3) / 1e12
            of_mm = f"{tflops / rate:.0%}" if rate else "-"
            print(f"{product:<14} {impl:<26} {ms:>10.3f} {tflops:>8.1f} {of_mm:>6} {base / ms:>8.2f}x")
            out.append(dict(bench="expert_products", product=product, impl=impl, N=x.shape[0], median_ms=ms,
                            tflops=tflops, matmul_tflops=rate))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small shape (32 experts, D 1024)")
    parser.add_argument("--n", type=int, nargs="+", help="tokens per step (default 2048 8192 16384)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--choice", help="write the faster canvasflow path at the largest N to this file")
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip timing each product alone at the tile candidates"
    )
    parser.add_argument("--output", default=RESULTS, help="JSON-lines file the results are appended to")
    parser.add_argument("--no-record", action="store_true", help="print only, append nothing")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        require_cuda("bench_experts.py")
        shape, dtype = ("small" if args.quick else "26b-a4b"), torch.bfloat16
        sizes = args.n or ([512, 2048] if args.quick else [2048, 8192, 16384])
        rate = matmul_tflops()
    else:  # Triton's interpreter: the tiny shape in float32 (bf16 products are emulated there)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shape, dtype, sizes, args.no_record, rate = "tiny", torch.float32, args.n or [37], True, None
    experts, top_k = build_experts(shape, args.device, dtype)
    env = environment()
    dim, inner = experts.hidden_dim, experts.intermediate_dim
    print(
        f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}{' + uncommitted changes' if env['dirty'] else ''}"
    )
    print(
        f"experts {shape}: E={experts.num_experts} k={top_k} D={dim} I={inner} {str(dtype)[6:]} | measured "
        f"matmul rate {rate and round(rate)} TFLOP/s | TFLOP/s count 2 x N x k x 3DI\n"
    )
    print(
        f"{'N':>6} {'path':<13} {'median ms':>10} {'q20':>8} {'q80':>8} {'TFLOP/s':>8} {'of mm':>6} {'vs grouped_mm':>14}"
    )
    rows, results = [], {}
    for num in sizes:
        x, index, weights = routed_tokens(num, experts, top_k, args.device, dtype)
        flops = 2 * num * top_k * 3 * dim * inner
        results = {}
        for path in args.paths:
            with torch.no_grad():
                fn = lambda p=path, x=x, i=index, w=weights: run(p, experts, x, i, w)  # noqa: E731
                timing = (
                    cuda_time(fn, warmup=2, reps=args.reps)
                    if args.device == "cuda"
                    else wall_time(fn, warmup=1, reps=2)
                )
            tflops = flops / (timing["median_ms"] * 1e-3) / 1e12
            results[path] = dict(bench="experts", shape=shape, path=path, N=num, top_k=top_k, D=dim, I=inner,
                                 **timing, tflops=tflops, matmul_tflops=rate,
                                 fraction_of_matmul=tflops / rate if rate else None)  # fmt: skip
        base = results.get("grouped_mm", {}).get("median_ms")
        for path, r in results.items():
            r["speedup_vs_grouped_mm"] = base / r["median_ms"] if base else None
            of_mm = f"{r['fraction_of_matmul']:.0%}" if rate else "-"
            vs = f"{r['speedup_vs_grouped_mm']:.2f}x" if base else "-"
            print(
                f"{num:>6} {path:<13} {r['median_ms']:>10.3f} {r['q20_ms']:>8.3f} {r['q80_ms']:>8.3f} "
                f"{r['tflops']:>8.1f} {of_mm:>6} {vs:>14}"
            )
            rows.append(r)
    if not args.no_sweep:
        if args.device == "cuda":
            timer = lambda fn: cuda_time(fn, warmup=2, reps=args.reps)  # noqa: E731
        else:
            timer = lambda fn: wall_time(fn, warmup=0, reps=1)  # noqa: E731
        rows += sweep_products(experts, x, index, timer, rate)
    ours = {p: r["median_ms"] for p, r in results.items() if p != "transformers"}
    if args.choice and ours:
        choice = min(ours, key=ours.get)
        with open(args.choice, "w", encoding="utf-8") as f:
            f.write(choice + "\n")
        print(f"\nfaster canvasflow path at N={sizes[-1]}: {choice} (written to {args.choice})")
    if not args.no_record:
        append_results(args.output, rows)
        print(f"appended {len(rows)} results to {args.output}")


if __name__ == "__main__":
    main()
