"""Block KV caching of the mask-diffusion sampler: forward FLOPs saved, speed-up and accuracy vs the exact path.

For each decoding rule (LLaDA's step schedule; Fast-dLLM's threshold) the held-out tiny tasks are generated
with cache=none (the exact path: the whole sequence every step), prefix and dual. Reported per run: exact-
match accuracy and mean partial-credit score (answer characters right at their position) from
pipeline.tasks.checker, rows whose completion equals the exact path's, forward passes per row, forward FLOPs
computed (dense products, attention, vocabulary head; padding included) and without padding (the
algorithm's own work), FLOPs saved (both ways) and wall-clock speed-up relative to the exact path of the
same rule.

    python benchmarks/bench_mask_cache.py                       # builtin:tiny-llada, CPU, ~1 minute
    python benchmarks/bench_mask_cache.py --model /tmp/tiny-llada --threads 2   # a model from train_tiny_llada
    python benchmarks/bench_mask_cache.py --model /models/LLaDA-8B-Instruct --device cuda --dtype bfloat16

Results are appended to benchmarks/results/mask_cache.jsonl (with device, commit and date).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_results, positive_int  # noqa: E402
from pipeline.models.loader import load_model  # noqa: E402
from pipeline.sampler.engine import Request  # noqa: E402
from pipeline.sampler.mask.engine import MaskDiffusionSampler  # noqa: E402
from pipeline.sampler.mask.settings import resolve_mask_settings  # noqa: E402
from pipeline.tasks.checker import check_row  # noqa: E402
from pipeline.training.data import encode_prompt  # noqa: E402
from pipeline.training.evaluate import heldout_instances  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mask_cache.jsonl"


def run_once(loaded, instances, prompts, knobs: dict, batch: int) -> dict:
    info = loaded.info
    settings = resolve_mask_settings(
        knobs,
        info.generation_config,
        family=info.family,
        mask_token_id=info.mask_token_id,
        eos_token_ids=info.eos_token_ids,
        pad_token_id=info.pad_token_id,
    )
    sampler = MaskDiffusionSampler(
        loaded.model, settings, max_batch=batch, max_prompt_tokens=max(len(p) for p in prompts)
    )
    requests = [Request(f"row-{i}", p) for i, p in enumerate(prompts)]
    if loaded.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = sampler.generate(requests)
    if loaded.model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    completions = [loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
    verdicts = [
        check_row({"prompt": inst.prompt, "completion": c})
        for inst, c in zip(instances, completions, strict=True)
    ]
    correct = [bool(v["is_correct"]) for v in verdicts]
    return {
        "settings": settings,
        "completions": completions,
        "accuracy": sum(correct) / len(correct),
        "score": sum(v["score"] for v in verdicts) / len(verdicts),  # partial credit: answer characters right
        "passes_per_row": sum(r.denoising_steps for r in results) / len(results),
        "flops": sampler.stats.flops(loaded.model),
        "flops_unpadded": sampler.stats.flops(loaded.model, padded=False),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny-llada")
    parser.add_argument("--rows-per-task", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument(
        "--gen", type=positive_int, default=None, help="max_new_tokens (default: the model's)"
    )
    parser.add_argument(
        "--block", type=positive_int, default=None, help="block_length (default: the model's)"
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="steps (default: max_new_tokens)")
    parser.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM threshold rule")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=7, help="held-out set seed")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    instances = heldout_instances(args.rows_per_task, args.seed)
    prompts = [encode_prompt(loaded.tokenizer, inst.prompt) for inst in instances]
    base = {
        k: v
        for k, v in {"max_new_tokens": args.gen, "block_length": args.block, "steps": args.steps}.items()
        if v
    }
    rows = []
    header = (
        f"{'rule':<16}{'cache':<8}{'accuracy':>9}{'score':>7}{'same':>7}{'passes':>8}{'GFLOP':>9}{'saved':>8}"
        f"{'GFLOP*':>9}{'saved*':>8}{'wall s':>8}{'speed-up':>9}   (* without padding)"
    )
    print(f"model {args.model} ({loaded.info.family}), {len(instances)} held-out rows, device {args.device}")
    print(header)
    for rule, extra in (("schedule", {}), (f"threshold {args.threshold:g}", {"threshold": args.threshold})):
        exact = None
        for cache in ("none", "prefix", "dual"):
            out = run_once(loaded, instances, prompts, {**base, **extra, "cache": cache}, args.batch)
            exact = exact or out
            same = sum(a == b for a, b in zip(out["completions"], exact["completions"], strict=True))
            saved = 1 - out["flops"] / exact["flops"]
            saved_unpadded = 1 - out["flops_unpadded"] / exact["flops_unpadded"]
            speedup = exact["wall_s"] / out["wall_s"]
            print(
                f"{rule:<16}{cache:<8}{out['accuracy']:>9.1%}{out['score']:>7.3f}{same / len(prompts):>7.0%}"
                f"{out['passes_per_row']:>8.2f}{out['flops'] / 1e9:>9.2f}{saved:>8.1%}"
                f"{out['flops_unpadded'] / 1e9:>9.2f}{saved_unpadded:>8.1%}{out['wall_s']:>8.2f}{speedup:>8.2f}x"
            )
            s = out["settings"]
            rows.append(
                {
                    "model": args.model,
                    "rule": rule,
                    "cache": cache,
                    "max_new_tokens": s.max_new_tokens,
                    "block_length": s.block_length,
                    "steps": s.steps,
                    "rows": len(prompts),
                    "batch": args.batch,
                    "accuracy": out["accuracy"],
                    "score": out["score"],
                    "same_as_exact": same / len(prompts),
                    "passes_per_row": out["passes_per_row"],
                    "forward_flops": out["flops"],
                    "flops_saved": saved,
                    "forward_flops_unpadded": out["flops_unpadded"],
                    "flops_saved_unpadded": saved_unpadded,
                    "wall_s": out["wall_s"],
                    "speedup": speedup,
                    "threads": args.threads,
                }
            )
    if not args.no_record:
        append_results(str(RESULTS), rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
