"""What a shard's drain costs: decoder passes to generate the same rows in shards of different sizes.

A worker runs one shard at a time through continuous batching: while queued rows remain, every finished row's
slot is refilled at once; at the end of a shard nothing is left to admit, so the batch empties as its last rows
finish. On a GPU a decoder pass costs about the same for a full or a nearly empty batch, so the passes spent
on a set of rows measure its time. This script generates the same rows (the shipped prompts, repeated, with
fixed ids: the completions are the same whatever the shards) in shards of each size and reports the decoder
passes against one queue of all rows (the last shard size, by default every row at once).

    python benchmarks/bench_shard_size.py                       # the tiny model on the CPU, about a minute
    python benchmarks/bench_shard_size.py --model /models/dg --device cuda --batches 32 64 --rows 4096 \\
        --shards 64 256 1024 4096

Results are appended to benchmarks/results/shard_size.jsonl. The job warns when run.shard_size is below 8
batches (pipeline/runner/job.py: warn_shard_drain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results  # noqa: E402
from pipeline import LLM  # noqa: E402
from pipeline.config.schema import BUILTIN_MODEL  # noqa: E402
from pipeline.data.readers import SHIPPED_PROMPTS  # noqa: E402

RESULTS = str(ROOT / "benchmarks" / "results" / "shard_size.jsonl")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--shards", type=int, nargs="+", default=[16, 64, 256, 512])
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    shipped = [
        json.loads(line)["prompt"] for line in SHIPPED_PROMPTS.read_text(encoding="utf-8").splitlines()
    ]
    prompts = [shipped[i % len(shipped)] for i in range(args.rows)]
    ids = [f"row-{i}" for i in range(args.rows)]
    results, completions = [], None
    print(f"{'batch':>6} {'shard':>6} {'shards':>7} {'passes':>8} {'vs one queue':>13} {'s':>7}")
    for batch in args.batches:
        llm = LLM(args.model, device=args.device, batch_size=batch)
        stats = llm.generator.sampler.stats
        rows = []
        for shard in args.shards:
            before, started = stats.decoder_calls, time.perf_counter()
            out = []
            for start in range(0, args.rows, shard):
                out += llm.generate(prompts[start : start + shard], ids=ids[start : start + shard])
            seconds = time.perf_counter() - started
            texts = [c.completion for c in out]
            if completions is None:
                completions = texts
            assert texts == completions, "completions must not depend on the shard size or the batch"
            rows.append(
                {"batch": batch, "shard": shard, "passes": stats.decoder_calls - before, "s": seconds}
            )
        base = rows[-1]["passes"]
        for row in rows:
            row.update(
                bench="shard_size",
                model=args.model,
                rows=args.rows,
                shards=-(-args.rows // row["shard"]),
                passes_vs_one_queue=round(row["passes"] / base, 3),
                s=round(row["s"], 2),
            )
            print(
                f"{row['batch']:>6} {row['shard']:>6} {row['shards']:>7} {row['passes']:>8} "
                f"{row['passes_vs_one_queue']:>12.2f}x {row['s']:>7.1f}"
            )
        results += rows
    if not args.no_record:
        append_results(RESULTS, results)
        print(f"appended {len(results)} rows to {RESULTS}")
    return results


if __name__ == "__main__":
    main()
