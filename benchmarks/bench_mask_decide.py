"""Peak memory of one step's vocabulary head and decisions in the mask sampler (MaskDiffusionSampler._decide),
with the rows split so that their float32 logits stay within `decide_bytes` (the default, 256 MiB) and all at
once (the split turned off), at growing batch sizes.

The workload is the heaviest one a user picks: Dream-7B's vocabulary (152,064 tokens), one block of
`--positions` positions (Dream's default is one block for the whole answer), and Dream's recommended sampling
(remasking=entropy, temperature 0.2, top_p 0.95: a sort of every position's logits). The intermediates are
several float32 [rows, positions, vocabulary] tensors, so without the split the step's memory grows with the
batch and caps it. The hidden size is `--hidden` (small by default: it does not change the [rows, positions,
vocabulary] intermediates, only the head's product).

On a GPU, extra memory is torch.cuda.max_memory_allocated above what was allocated before the call; on a CPU,
each measurement runs in a fresh process and reports its peak resident memory (VmHWM) above its resident
memory before the call. Needs only torch.

    python benchmarks/bench_mask_decide.py                          # GPU: rows 8 16 32 64, 256 positions
    python benchmarks/bench_mask_decide.py --rows 2 4 8 --positions 64 --no-record   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import append_results, peak_extra_memory, positive_int  # noqa: E402
from pipeline.models.bidirectional import BidirectionalLM, MaskLMSpec  # noqa: E402
from pipeline.sampler.mask.decide import StepKeys  # noqa: E402
from pipeline.sampler.mask.engine import DECIDE_BYTES, MaskDiffusionSampler  # noqa: E402
from pipeline.sampler.mask.settings import MaskSettings  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "mask_decide.jsonl")
VOCAB, MASK_ID = 152_064, 151_666  # Dream-v0-Instruct-7B
UNSPLIT = 1 << 62


def _vmhwm_kib() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])


def _vmrss_kib() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])


def measure(rows: int, positions: int, hidden: int, decide_bytes: int, device: str) -> dict:
    """One call of _decide on random hidden states with every position masked (the first step)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = MaskLMSpec(
        family="dream", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden, num_layers=1,
        num_heads=1, num_kv_heads=1, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=False,
        mask_token_id=MASK_ID, shift_logits=True, context_window=4096,
    )  # fmt: skip
    model = BidirectionalLM(spec).to(device=device, dtype=dtype)
    settings = MaskSettings(
        algorithm="dream", max_new_tokens=positions, steps=positions, block_length=positions, remasking="entropy",
        temperature=0.2, top_p=0.95, mask_token_id=MASK_ID, eos_token_ids=(151_643,), pad_token_id=151_643,
    )  # fmt: skip
    sampler = MaskDiffusionSampler(model, settings, max_batch=rows, decide_bytes=decide_bytes)
    states = torch.randn(rows, positions, hidden, device=device, dtype=dtype)
    block = torch.full((rows, positions), MASK_ID, device=device)
    step = torch.zeros(rows, dtype=torch.long, device=device)
    keys = StepKeys(
        k0=torch.arange(rows, device=device), k1=torch.arange(rows, device=device) + 1,
        block=torch.zeros(rows, dtype=torch.long, device=device), step=step,
        gen_positions=torch.arange(positions, device=device).expand(rows, positions),
    )  # fmt: skip
    call = lambda: sampler._decide(states, block, step, keys)  # noqa: E731
    chunk = sampler.decide_rows(positions)
    if device == "cuda":
        call()  # warm-up (allocator, kernels)
        started = time.perf_counter()
        _, extra = peak_extra_memory(call)
        seconds = time.perf_counter() - started
    else:
        before = _vmrss_kib()
        if _vmhwm_kib() > before:  # setup peaked above the current footprint: measure from the setup's peak
            before = _vmhwm_kib()
        started = time.perf_counter()
        call()
        seconds = time.perf_counter() - started
        extra = max(0, _vmhwm_kib() - before) * 1024
    return {"rows_per_chunk": min(chunk, rows), "extra_gib": extra / 2**30, "seconds": seconds}


def run_cpu(args: argparse.Namespace, rows: int, decide_bytes: int) -> dict | None:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.bench_mask_decide import measure; "
        "print(json.dumps(measure(*map(int, sys.argv[2:6]), 'cpu')))"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        ROOT,
        str(rows),
        str(args.positions),
        str(args.hidden),
        str(decide_bytes),
    ]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None  # killed (out of memory) or failed
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, nargs="+", default=None, help="batch sizes")
    parser.add_argument("--positions", type=positive_int, default=None, help="block positions (default 256)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden size of the head")
    parser.add_argument(
        "--budget-mib",
        type=positive_int,
        default=DECIDE_BYTES >> 20,
        help="decide_bytes of the split, in MiB",
    )
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rows = args.rows or ([8, 16, 32, 64] if device == "cuda" else [2, 4, 8])
    args.positions = args.positions or (256 if device == "cuda" else 64)
    print(
        f"device {device}: vocabulary {VOCAB}, {args.positions} positions, hidden {args.hidden}, entropy + top_p "
        f"0.95 + temperature 0.2; float32 logits {args.positions * VOCAB * 4 / 2**20:.0f} MiB per row"
    )
    print(f"{'rows':>5} {'split':>9} {'rows/chunk':>11} {'extra GiB':>10} {'seconds':>8}")
    records = []
    for rows in args.rows:
        for label, budget in ((f"{args.budget_mib} MiB", args.budget_mib << 20), ("off", UNSPLIT)):
            if device == "cuda":
                try:
                    out = measure(rows, args.positions, args.hidden, budget, device)
                except torch.cuda.OutOfMemoryError:
                    out = None
                torch.cuda.empty_cache()
            else:
                out = run_cpu(args, rows, budget)
            if out is None:
                print(f"{rows:>5} {label:>9} {'':>11} {'out of memory':>10}")
                records.append({"rows": rows, "split": label, "positions": args.positions, "oom": True})
                continue
            print(
                f"{rows:>5} {label:>9} {out['rows_per_chunk']:>11} {out['extra_gib']:>10.2f} {out['seconds']:>8.2f}"
            )
            records.append({"rows": rows, "split": label, "positions": args.positions, "vocab": VOCAB, **out})
    if not args.no_record:
        append_results(RESULTS, [{"bench": "mask_decide", **r} for r in records])
        print(f"appended {len(records)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
