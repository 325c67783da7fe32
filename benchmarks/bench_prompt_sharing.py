"""Several completions per prompt, or prompts with a common start: the prompt (or its common blocks) encoded once
and copied into the other rows' KV-cache slots (`share_prompts`, the default) against encoded for every row, on
the same model and requests.

Synthetic-data jobs often draw several completions of each prompt (`sampler.completions_per_prompt`, for
rejection sampling or preference pairs), and their prompts can be long (a document to summarise or question).
Each completion's own draws are keyed by (seed, row id, completion); its prompt's keys and values are the same
for all of them. Many jobs also give every prompt the same system prompt, template text or few-shot
examples, whose keys and values are the same in every row. The script reports wall time, tokens/s, the padded tokens pushed through the encoder and the
prompt tokens copied instead, and checks that both ways give the same completions.

    python benchmarks/bench_prompt_sharing.py                  # CPU-sized defaults, about 2 minutes
    python benchmarks/bench_prompt_sharing.py --prompts 64 --completions 8 --prompt-tokens 2048 --batch 64
    python benchmarks/bench_prompt_sharing.py --prompts 32 --completions 1 --common-prefix 704   # a system prompt

The model is bench_batching's (a small random DiffusionGemma-architecture checkpoint, canvas 32, sharpened
so that rows stop early). Results are appended to benchmarks/results/prompt_sharing.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_batching import build_model  # noqa: E402
from benchmarks.common import append_results, positive_int  # noqa: E402
from pipeline.sampler.engine import DiffusionSampler, Request  # noqa: E402
from pipeline.sampler.settings import SamplerSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_sharing.jsonl"


def workload(prompts: int, completions: int, tokens: int, common: int, vocab: int) -> list[Request]:
    """`completions` requests per prompt, adjacent, as the job's reader emits them; every prompt starts with the
    same `common` tokens (a system prompt) and ends with `tokens` - `common` of its own."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(7, vocab, (common,), generator=gen).tolist()
    out = []
    for i in range(prompts):
        ids = head + torch.randint(7, vocab, (tokens - common,), generator=gen).tolist()
        out.extend(Request(f"row-{i}", ids, completion=c) for c in range(completions))
    return out


def run(model, settings, requests, batch: int, share: bool, max_prompt_tokens: int, repeats: int) -> dict:
    """The median wall time of `repeats` runs (the counters and completions are the same in each)."""
    sampler = DiffusionSampler(
        model, settings, max_batch=batch, max_prompt_tokens=max_prompt_tokens, share_prompts=share
    )
    sampler.generate(requests[:batch])  # warm-up: allocations, kernel choices
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    walls = []
    for _ in range(repeats):
        sampler.stats = type(sampler.stats)()
        sync()
        start = time.perf_counter()
        results = sampler.generate(requests)
        sync()
        walls.append(time.perf_counter() - start)
    wall = statistics.median(walls)
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "share_prompts": share,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "encoder_tokens": sampler.stats.encoder_tokens,
        "prompt_tokens_shared": sampler.stats.prompt_tokens_shared,
        "decoder_row_steps": sampler.stats.decoder_row_steps,
        "completions": [(r.row_id, r.token_ids) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=positive_int, default=8)
    parser.add_argument("--completions", type=positive_int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-tokens", type=positive_int, default=768)
    parser.add_argument(
        "--common-prefix", type=int, default=0, help="leading tokens all prompts share (a system prompt)"
    )
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--canvases", type=positive_int, default=2, help="max_new_tokens in canvases of 32")
    parser.add_argument("--steps", type=positive_int, default=16, help="max_denoising_steps")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "canvasflow" / "bench")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.cache, 10.0, args.device, dtype)
    settings = SamplerSettings(
        max_new_tokens=32 * args.canvases, max_denoising_steps=args.steps, t_min=0.4, t_max=0.8,
        entropy_bound=0.1, stability_threshold=1, confidence_threshold=0.5, canvas_length=32,
        eos_token_ids=(1,), pad_token_id=0,
    )  # fmt: skip
    if not 0 <= args.common_prefix <= args.prompt_tokens:
        parser.error(f"--common-prefix {args.common_prefix} must be between 0 and --prompt-tokens")
    requests = workload(
        args.prompts, args.completions, args.prompt_tokens, args.common_prefix, model.vocab_size
    )
    runs = [
        run(model, settings, requests, args.batch, share, args.prompt_tokens, args.repeats)
        for share in (False, True)
    ]
    identical = runs[0]["completions"] == runs[1]["completions"]
    print(
        f"device {args.device}: {args.prompts} prompts x {args.completions} completions, {args.prompt_tokens}-token "
        f"prompts ({args.common_prefix} in common), batch {args.batch}, up to {args.canvases} canvases x "
        f"{args.steps} steps"
    )
    print(
        f"{'prompts':<10}{'encoder tokens':>16}{'copied':>10}{'row-steps':>11}{'wall s':>9}{'tokens/s':>10}"
    )
    for r in runs:
        print(
            f"{'shared' if r['share_prompts'] else 'encoded':<10}{r['encoder_tokens']:>16}"
            f"{r['prompt_tokens_shared']:>10}{r['decoder_row_steps']:>11}{r['wall_s']:>9.2f}{r['tokens_per_s']:>10.1f}"
        )
    speedup = runs[0]["wall_s"] / runs[1]["wall_s"]
    print(f"sharing the prompt is {speedup:.2f}x faster; completions identical: {identical}")
    if not args.no_record:
        keys = ("prompts", "completions", "prompt_tokens", "common_prefix", "batch", "canvases", "steps")
        setup = {"bench": "prompt_sharing", "device_arg": args.device, **{k: getattr(args, k) for k in keys}}
        records = [{**setup, **{k: v for k, v in r.items() if k != "completions"}} for r in runs]
        append_results(str(RESULTS), [*records, {**setup, "speedup": speedup, "identical": identical}])
    if not identical:
        print("sharing the prompt changed completions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
