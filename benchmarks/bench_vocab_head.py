"""Vocabulary head benchmark at DiffusionGemma's shape (V = 262,144, D = 2,816, bf16), N positions per step.

Paths, all producing the sampled token, argmax, entropy and the self-conditioning input softmax(z) @ E:
  reference      the transformers sequence: logits product, float32 soft-cap and temperature, softmax,
                 multinomial, argmax, Categorical entropy, the per-canvas sort of entropies, softmax(z) @ E
  torch-chunked  canvasflow's pure-torch reference (vocab_head_reference: position chunks, keyed Gumbel-max)
  triton         the fused path (vocab_head_triton)

Reports the median time by CUDA events (and the 20%/80% quantiles), TFLOP/s counting the two vocabulary
products (2 x 2NVD) against the device's measured bf16 matmul rate, peak extra memory, and the speed-up over
the reference; appends one JSON line per result to benchmarks/results/vocab_head.jsonl. Needs only torch and
triton:  python benchmarks/bench_vocab_head.py [--quick]
A smoke run on the CPU (tiny shapes, Triton's interpreter, wall-clock timing, no memory figures, nothing
recorded):  python benchmarks/bench_vocab_head.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's `pipeline` and `benchmarks`, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    append_results,
    cuda_time,
    environment,
    matmul_tflops,
    peak_extra_memory,
    require_cuda,
    wall_time,
)

SOFTCAP = 30.0  # DiffusionGemma's final_logit_softcapping
CANVAS = 256  # positions per canvas: the acceptance sorts entropies per canvas
RESULTS = os.path.join(ROOT, "benchmarks", "results", "vocab_head.jsonl")


def transformers_head(hidden, embedding, temperature, state):
    """The sequence of transformers' DiffusionGemma step, materialising [N, V] float32 tensors."""
    z = F.linear(hidden, embedding).float()  # [N, V]
    z = torch.tanh(z / SOFTCAP) * SOFTCAP
    z = z / temperature[:, None]
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs, num_samples=1).squeeze(-1)  # [N]
    argmax = torch.argmax(z, dim=-1)
    entropy = torch.distributions.Categorical(logits=z).entropy()  # [N]
    order = torch.sort(entropy.view(-1, min(CANVAS, entropy.numel())), dim=-1)
    soft = (
        z.to(embedding.dtype).softmax(dim=-1, dtype=torch.float32).to(embedding.dtype) @ embedding
    )  # [N, D]
    return sampled, argmax, entropy, order, soft


def torch_chunked_head(hidden, embedding, temperature, state):
    from pipeline.kernels.vocab_head.reference import vocab_head_reference

    return vocab_head_reference(
        hidden, embedding, softcap=SOFTCAP, temperature=temperature, sample_state=state, want_soft=True
    )


def triton_head(hidden, embedding, temperature, state):
    from pipeline.kernels.vocab_head.triton_head import vocab_head_triton

    return vocab_head_triton(
        hidden, embedding, softcap=SOFTCAP, temperature=temperature, sample_state=state, want_soft=True
    )


PATHS: dict[str, Callable] = {
    "reference": transformers_head,
    "torch-chunked": torch_chunked_head,
    "triton": triton_head,
}


def make_inputs(num: int, vocab: int, dim: int, seed: int = 0, device: str = "cuda"):
    """hidden [N, D] and embedding [V, D] bf16 with logits of standard deviation ~5, temperature [N] in
    [0.4, 0.8] float32, sample_state [N] int64 words."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num, dim, device=device, generator=g).bfloat16()
    embedding = (torch.randn(vocab, dim, device=device, generator=g) * (5.0 / dim**0.5)).bfloat16()
    temperature = 0.4 + 0.4 * torch.rand(num, device=device, generator=g)
    state = torch.randint(0, 2**32, (num,), device=device, generator=g)
    return hidden, embedding, temperature, state


def measure(path: str, num: int, vocab: int, dim: int, args, rate: float) -> dict:
    """One path at one N: timing, TFLOP/s and peak extra memory, or the out-of-memory error."""
    inputs = make_inputs(num, vocab, dim, device=args.device)
    fn = PATHS[path]
    row = {"bench": "vocab_head", "path": path, "N": num, "V": vocab, "D": dim, "dtype": "bfloat16"}
    try:
        if args.device == "cuda":
            _, extra = peak_extra_memory(lambda: fn(*inputs))
            timing = cuda_time(lambda: fn(*inputs), warmup=args.warmup, reps=args.reps)
        else:
            extra, timing = 0, wall_time(lambda: fn(*inputs), warmup=1, reps=2)
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "error": f"out of memory: {str(e).splitlines()[0]}"}
    tflops = 2 * (2 * num * vocab * dim) / (timing["median_ms"] * 1e-3) / 1e12  # both vocabulary products
    return {
        **row,
        **timing,
        "tflops": tflops,
        "matmul_tflops": rate,
        "fraction_of_matmul": tflops / rate,
        "extra_bytes": extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (N 64/256, V 32768, D 1024)")
    parser.add_argument("--n", type=int, nargs="+", help="positions per step (default 256 2048 8192)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--output", default=RESULTS, help="JSON-lines file the results are appended to")
    parser.add_argument("--no-record", action="store_true", help="print only, append nothing")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        require_cuda("bench_vocab_head.py")
        vocab, dim = (32768, 1024) if args.quick else (262144, 2816)
        sizes = args.n or ([64, 256] if args.quick else [256, 2048, 8192])
        rate = matmul_tflops()
    else:  # Triton's interpreter: tiny shapes, and the rate of a CPU product for the "of mm" column
        os.environ.setdefault("TRITON_INTERPRET", "1")
        vocab, dim, sizes, args.no_record = 1000, 72, args.n or [37], True
        started = time.perf_counter()
        a = torch.randn(512, 512)
        for _ in range(4):
            a @ a
        rate = 4 * 2 * 512**3 / (time.perf_counter() - started) / 1e12
    env = environment()
    print(
        f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}{' + uncommitted changes' if env['dirty'] else ''}"
    )
    print(f"measured bf16 matmul rate: {rate:.0f} TFLOP/s | V={vocab} D={dim} | TFLOP/s count 2 x 2NVD\n")
    header = f"{'N':>6} {'path':<14} {'median ms':>10} {'q20':>9} {'q80':>9} {'TFLOP/s':>8} {'of mm':>6} "
    print(header + f"{'extra GiB':>10} {'vs ref':>7}")
    rows = []
    for num in sizes:
        results = {}
        for path in args.paths:
            results[path] = measure(path, num, vocab, dim, args, rate)
            if args.device == "cuda":
                torch.cuda.empty_cache()  # the reference's [N, V] tensors must not count against the next path
        base = results.get("reference", {}).get("median_ms")
        for path, r in results.items():
            if "error" in r:
                print(f"{num:>6} {path:<14} {r['error']}")
            else:
                r["speedup_vs_reference"] = base / r["median_ms"] if base else None
                speedup = f"{r['speedup_vs_reference']:.2f}x" if base else "-"
                print(
                    f"{num:>6} {path:<14} {r['median_ms']:>10.2f} {r['q20_ms']:>9.2f} {r['q80_ms']:>9.2f} "
                    f"{r['tflops']:>8.0f} {r['fraction_of_matmul']:>6.0%} {r['extra_bytes'] / 2**30:>10.2f} "
                    f"{speedup:>7}"
                )
            rows.append(r)
    if not args.no_record:
        append_results(args.output, rows)
        print(f"\nappended {len(rows)} results to {args.output}")


if __name__ == "__main__":
    main()
