"""Where a decoder step's time must go, without a GPU: the step of canvasflow's sampler at a real shape, run
on meta tensors (shapes only), every aten operation and Triton launch recorded with its FLOPs and the bytes
it must move, each given its roofline floor max(FLOP / matmul rate, bytes / bandwidth), and summed by kind.

    python benchmarks/step_profile.py                       # 26B-A4B, batch 32, torch vs triton kernels
    python benchmarks/step_profile.py --batch 8 --shape small
    python benchmarks/step_profile.py --tflops 724 --bandwidth 4.3   # the ceilings to divide by (H200 here)

This is a model, not a measurement: it counts what each kernel must read and write once (views are free,
in-place outputs count once) and assumes every kernel runs at the ceiling. It shows how many kernels a step
launches, how many bytes the elementwise passes move and how far the step is from the matmul floor, before
and after a change to the op sequence: the measured figures come from bench_generate.py on the GPU.
Needs torch and transformers (and triton for the triton column); appends to results/step_profile.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import build_model  # noqa: E402
from benchmarks.common import append_results  # noqa: E402
from pipeline.models.moe import GEMMS  # noqa: E402

RESULTS = str(Path(__file__).resolve().parent / "results" / "step_profile.jsonl")
FREE = {  # aten ops that move no data (views, metadata)
    "view", "_unsafe_view", "alias", "t", "transpose", "expand", "slice", "unsqueeze", "squeeze", "select",
    "permute", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "detach", "lift_fresh",
    "_reshape_alias", "reshape", "empty", "empty_like", "empty_strided", "view_as_real", "unfold",
}  # fmt: skip
MATMULS = {"mm", "addmm", "bmm", "_grouped_mm", "matmul", "linear", "baddbmm"}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _matmul_flops(name: str, args, out) -> int:
    if name == "_grouped_mm":  # [M, K] x [G, K, N] -> [M, N]
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[-1]
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    return 2 * out.numel() * a.shape[-1]


def _attention_flops(args) -> int:
    q, k = args[0], args[1]  # [B, H, T, d], [B, Hkv, S, d]
    batch, heads, tokens, dim = q.shape
    return 4 * batch * heads * tokens * k.shape[-2] * dim


class OpProfile(TorchDispatchMode):
    """Counts kernels, FLOPs and bytes per kind of aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.ops: list[tuple[str, str, float, float]] = []  # (kind, op, flops, bytes)

    def add(self, kind: str, op: str, flops: float, nbytes: float) -> None:
        row = self.rows[kind]
        row["kernels"] += 1
        row["flops"] += flops
        row["bytes"] += nbytes
        self.ops.append((kind, op, flops, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in FREE:
            return out
        inputs, _ = tree_flatten((args, kwargs))
        outputs, _ = tree_flatten(out)
        in_place = name.endswith("_") or "out" in kwargs
        nbytes = _bytes(inputs) + (0 if in_place else _bytes(outputs))
        if name in MATMULS:
            self.add("matmul", name, _matmul_flops(name, args, outputs[0]), nbytes)
        elif "attention" in name:
            self.add("attention", name, _attention_flops(args), nbytes)
        elif name in ("index_put_", "index", "index_select", "index_add_", "gather", "scatter", "scatter_"):
            self.add("gather/scatter", name, 0, nbytes)
        elif name in (
            "sort",
            "argsort",
            "topk",
            "cumsum",
            "_softmax",
            "sum",
            "mean",
            "amax",
            "max",
            "argmax",
        ):
            self.add("reduction/sort", name, 0, nbytes)
        else:
            self.add("elementwise", name, 0, nbytes)
        return out


def _triton_launches(profile: OpProfile, run, span: int) -> None:
    """Runs `run()` with every Triton kernel of the package recorded (not launched) and adds each launch:
    bytes = its tensor arguments, each moved once (the vocabulary head's logits chunk twice, read + write;
    the canvas attention only the `span` keys and values of each row, not the whole cache; the head norms
    their input and as much output, also when they store into the cache)."""
    from pipeline.kernels.aot import recording_all

    with recording_all() as calls:
        run()
    for name, args, kwargs in calls:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        nbytes = _bytes(tensors) + (_bytes(tensors[:1]) if name == "_head_chunk_kernel" else 0)
        flops = 0
        if name == "_head_kernel":  # x in, as many bytes out (into the KV cache or not), cos/sin with rope
            x, _, cos, sin = tensors[:4]
            nbytes = 2 * _bytes([x]) + (_bytes([cos, sin]) if kwargs["ROPE"] else 0)
        if name == "_canvas_attention_kernel":  # reads only the rows' key ranges of the cache, not all of it
            q, keys, _, _, lo, hi, out = tensors[:7]  # then qpos, valid (the causal mode)
            kv_bytes = 2 * q.shape[0] * keys.shape[1] * span * keys.shape[3] * keys.element_size()
            nbytes = _bytes([q, out]) + kv_bytes
            flops = 4 * q.shape[0] * q.shape[2] * q.shape[1] * span * q.shape[3]
        if name == "_expert_gemm_kernel":  # the A rows it reads (gathered: k rows a token), weights, output
            x, rows, weight, _, out = tensors
            a_rows = rows.shape[0] if kwargs["GATHER"] else x.shape[0]
            nbytes = a_rows * x.shape[1] * x.element_size() + _bytes([weight, out])
            nbytes += _bytes([rows]) if kwargs["GATHER"] else 0
            flops = 2 * a_rows * weight.shape[1] * weight.shape[2]
        profile.add("triton: " + name.strip("_").removesuffix("_kernel"), name, flops, nbytes)


def build_sampler(
    shape: str,
    device: str,
    batch: int,
    canvas: int,
    prompt: int,
    backend: str,
    forward: str | None = None,
    moe_gemm: str = "auto",
):
    """canvasflow's sampler over bench_generate's model `shape` (random bf16 weights) on `device`, its
    storage allocated for `batch` rows of `prompt` tokens plus one canvas; CUDA graphs off. `backend` is the
    sampler's kernels; `forward` (default: the same) the model forward's."""
    from pipeline.models.diffusion_gemma import DiffusionGemmaTextModel
    from pipeline.sampler.engine import DiffusionSampler
    from pipeline.sampler.settings import SamplerSettings

    model = DiffusionGemmaTextModel(build_model(shape, device, torch.bfloat16, canvas), backend=backend)
    settings = SamplerSettings(
        max_new_tokens=canvas, max_denoising_steps=16, t_min=0.4, t_max=0.8, entropy_bound=0.1,
        stability_threshold=1, confidence_threshold=0.5, canvas_length=canvas, eos_token_ids=(1,), pad_token_id=0,
    )  # fmt: skip
    sampler = DiffusionSampler(
        model, settings, max_batch=batch, max_prompt_tokens=prompt, backend=backend, step_graphs="off"
    )
    if forward is not None:
        model.set_backend(forward)
    model.set_moe_gemm(moe_gemm)
    sampler._ensure_storage()
    return sampler


def profile_step(
    shape: str,
    batch: int,
    canvas: int,
    prompt: int,
    backend: str,
    forward: str | None = None,
    moe_gemm: str = "auto",
) -> OpProfile:
    sampler = build_sampler(shape, "meta", batch, canvas, prompt, backend, forward, moe_gemm)
    profile = OpProfile()
    kv_limit = sampler.capacity  # prompt + canvas, as the CUDA path reads (rounded up to 256 there)

    def run() -> None:
        with profile:
            sampler._step(batch, None, kv_limit)

    if "triton" in (backend, forward):
        _triton_launches(profile, run, span=sampler.capacity)
    else:
        run()
    return profile


def floor_ms(flops: float, nbytes: float, tflops: float, bandwidth: float) -> float:
    return max(flops / (tflops * 1e12), nbytes / (bandwidth * 1e12)) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="26b-a4b", choices=["26b-a4b", "small", "tiny"])
    parser.add_argument("--batch", type=int, default=32, help="rows per step (default 32)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument(
        "--tflops", type=float, default=724.0, help="bf16 matmul rate (default: H200, measured)"
    )
    parser.add_argument(
        "--bandwidth", type=float, default=4.3, help="memory bandwidth in TB/s (default: H200)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["torch/torch", "triton/torch", "triton/triton/grouped_mm", "triton/triton"],
        help="SAMPLER/FORWARD[/MOE_GEMM] kernel backends to compare (default: all torch; the Triton sampler "
        "kernels with the torch forward, as before the fused forward kernels; all Triton with the experts on "
        "torch._grouped_mm; all Triton)",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to results/step_profile.jsonl"
    )
    args = parser.parse_args(argv)

    profiles = {}
    for config in args.configs:
        sampler_kernels, _, rest = config.partition("/")
        forward, _, moe_gemm = rest.partition("/")
        if {sampler_kernels, forward or sampler_kernels} - {"torch", "triton"} or (
            moe_gemm or "auto"
        ) not in GEMMS:
            parser.error(
                f"--configs {config!r}: give SAMPLER/FORWARD[/MOE_GEMM]: torch or triton, and one of "
                f"{', '.join(GEMMS)}"
            )
        profiles[config] = profile_step(
            args.shape, args.batch, args.canvas, args.prompt, sampler_kernels, forward or sampler_kernels,
            moe_gemm or "auto",
        )  # fmt: skip
    kinds = sorted({k for p in profiles.values() for k in p.rows}, key=lambda k: (k.startswith("triton"), k))
    rate = (args.tflops, args.bandwidth)
    print(
        f"decoder step, {args.shape}, batch {args.batch} x canvas {args.canvas} after a {args.prompt}-token prompt;"
        f" floors at {args.tflops:g} TFLOP/s and {args.bandwidth:g} TB/s (a model, not a measurement)"
    )
    print(f"{'sampler/forward kernels':<24}" + "".join(f"{b:>33}" for b in profiles))
    print(f"{'kind':<24}" + f"{'kernels':>15}{'GB':>8}{'floor ms':>10}" * len(profiles))
    records, totals = [], {b: [0, 0.0, 0.0, 0.0] for b in profiles}
    for kind in kinds:
        line = f"{kind:<24}"
        for b, p in profiles.items():
            row = p.rows.get(kind)
            if row is None:
                line += f"{'-':>15}{'-':>8}{'-':>10}"
                continue
            ms = sum(floor_ms(f, n, *rate) for k, _, f, n in p.ops if k == kind)
            line += f"{int(row['kernels']):>15}{row['bytes'] / 1e9:>8.2f}{ms:>10.2f}"
            t = totals[b]
            t[0] += int(row["kernels"])
            t[1] += row["bytes"]
            t[2] += row["flops"]
            t[3] += ms
            records.append(dict(kernels_config=b, kind=kind, kernels=int(row["kernels"]), bytes=row["bytes"],
                                flops=row["flops"], floor_ms=ms))  # fmt: skip
        print(line)
    print(f"{'total':<24}" + "".join(f"{t[0]:>15}{t[1] / 1e9:>8.2f}{t[3]:>10.2f}" for t in totals.values()))
    for b, t in totals.items():
        matmul_ms = t[2] / (args.tflops * 1e12) * 1e3
        print(
            f"{b} kernels: {t[2] / 1e12:.1f} TFLOP, matmul floor {matmul_ms:.1f} ms; sum of per-kernel floors "
            f"{t[3]:.1f} ms -> at most {matmul_ms / t[3]:.0%} model FLOP utilisation if every kernel ran at its "
            "ceiling"
        )
    if not args.no_record:
        config = dict(device="meta (roofline model)", shape=args.shape, batch=args.batch, canvas=args.canvas,
                      prompt=args.prompt, tflops=args.tflops, bandwidth=args.bandwidth)  # fmt: skip
        append_results(RESULTS, [dict(config, **r) for r in records])
    return 0


if __name__ == "__main__":
    sys.exit(main())
