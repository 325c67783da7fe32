"""What a shard's drain costs: decoder passes to generate the same rows in shards of different sizes.

A worker holding one shard at a time (run.shards_in_flight=1) runs it through continuous batching: while
queued rows remain, every finished row's slot is refilled at once; at the end of the shard nothing is left to
admit, so the batch empties as its last rows finish. On a GPU a decoder pass costs about the same for a full
or a nearly empty batch, so the passes spent on a set of rows measure its time. With two shards in flight
(the default) the worker's shards share one sampler (pipeline/runner/stream.py) and the next shard's rows
take the slots the last one frees. This script generates the same rows (the shipped prompts, repeated, with
fixed ids: the completions are the same whatever the shards) in shards of each size, one at a time and two
in flight as a worker holds them, and reports the decoder passes against one queue of all rows (the last
shard size, by default every row at once).

    python benchmarks/bench_shard_size.py                       # the tiny model on the CPU, about two minutes
    python benchmarks/bench_shard_size.py --model /models/dg --device cuda --batches 32 64 --rows 4096 \\
        --shards 64 256 1024 4096

Results are appended to benchmarks/results/shard_size.jsonl. The job warns when run.shard_size is below 8
batches with one shard in flight (pipeline/runner/plan.py: warn_shard_drain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results, positive_int  # noqa: E402
from pipeline import LLM  # noqa: E402
from pipeline.config.schema import BUILTIN_MODEL  # noqa: E402
from pipeline.data.readers import SHIPPED_PROMPTS  # noqa: E402
from pipeline.generation import PromptRecord  # noqa: E402
from pipeline.runner.stream import SharedSampler  # noqa: E402

RESULTS = str(ROOT / "benchmarks" / "results" / "shard_size.jsonl")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=positive_int, default=512)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[8, 32])
    parser.add_argument("--shards", type=positive_int, nargs="+", default=[16, 64, 256, 512])
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    shipped = [
        json.loads(line)["prompt"] for line in SHIPPED_PROMPTS.read_text(encoding="utf-8").splitlines()
    ]
    prompts = [shipped[i % len(shipped)] for i in range(args.rows)]
    ids = [f"row-{i}" for i in range(args.rows)]
    records = [PromptRecord(ids[i], prompts[i], False, i) for i in range(args.rows)]
    results, completions = [], None
    print(
        f"{'batch':>6} {'shard':>6} {'shards':>7} {'in flight':>10} {'passes':>8} {'vs one queue':>13} {'s':>7}"
    )
    for batch in args.batches:
        generator = LLM(args.model, device=args.device, batch_size=batch).generator
        stats = generator.sampler.stats
        rows = []
        for shard in args.shards:
            shards = [records[start : start + shard] for start in range(0, args.rows, shard)]
            for in_flight in (1, 2):
                before, started = stats.decoder_calls, time.perf_counter()
                out = _generate(generator, shards, in_flight)
                seconds = time.perf_counter() - started
                texts = [row["completion"] for row in sorted(out, key=lambda r: r["source_index"])]
                if completions is None:
                    completions = texts
                assert texts == completions, (
                    "completions must not depend on the shards, the batch or streaming"
                )
                passes = stats.decoder_calls - before
                rows.append(
                    {"batch": batch, "shard": shard, "in_flight": in_flight, "passes": passes, "s": seconds}
                )
        base = min(row["passes"] for row in rows if row["shard"] == args.shards[-1])
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
                f"{row['batch']:>6} {row['shard']:>6} {row['shards']:>7} {row['in_flight']:>10} {row['passes']:>8} "
                f"{row['passes_vs_one_queue']:>12.2f}x {row['s']:>7.1f}"
            )
        results += rows
    if not args.no_record:
        append_results(RESULTS, results)
        print(f"appended {len(results)} rows to {RESULTS}")
    return results


def _generate(generator, shards: list[list[PromptRecord]], in_flight: int) -> list[dict]:
    """The shards' rows as a worker holding `in_flight` shards makes them: the next shard starts when one of
    those in flight is done; with more than one in flight they share the sampler."""
    if in_flight == 1:
        return [row for shard in shards for row in generator.generate(shard).rows]
    shared = SharedSampler(generator.sampler)
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        outputs = pool.map(lambda shard: generator.generate(shard, shared=shared), shards)
        return [row for out in outputs for row in out.rows]


if __name__ == "__main__":
    main()
