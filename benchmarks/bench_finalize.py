"""What a run's shard count costs its driver: reading the commit markers and writing the manifest, in time and
peak memory, at tens of thousands of shards.

The driver holds every committed shard's marker (rows, tokens, checksums, the part's columns) from the resume
check to the end of the run, and finalize writes them all into `_manifest.json`. At the default
run.shard_size=64, ten million prompts are 156,250 shards, so what the driver holds and writes per shard bounds
the prompts one run can take. Each measurement runs in a fresh process on a local run directory of synthetic
markers (the output columns of a run without postprocess stage): the peak resident memory (VmHWM, Linux) is
that driver work's alone; bytes per shard count what it holds above 100 shards.

    python benchmarks/bench_finalize.py                         # 10k, 50k and 150k shards, about a minute
    python benchmarks/bench_finalize.py --shards 1000 --no-record
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import PEAK_RSS_MB, positive_int, probe, record  # noqa: E402

PROBE = """
import json, sys, time
from pipeline.io.commit import MANIFEST, RunStore
from pipeline.io.store import LocalStore
run = RunStore(LocalStore(sys.argv[1]), "bench")
started = time.perf_counter()
commits = run.committed()
read = time.perf_counter()
parts = [vars(commits[s]) for s in sorted(commits)]
manifest = {"run_id": "bench", "parts": parts, "rows_out": sum(p["rows"] for p in parts)}
run.finalize(commits, manifest, {}, "")
print(json.dumps({
    "shards": len(commits),
    "read_s": read - started,
    "finalize_s": time.perf_counter() - read,
    "manifest_mb": run.store.list_sizes(MANIFEST)[MANIFEST] / 1e6,
    "peak_rss_mb": PEAK_RSS_MB,
}))
""".replace("PEAK_RSS_MB", PEAK_RSS_MB)


def write_markers(folder: str, shards: int) -> str:
    """A run directory holding `shards` commit markers of 64-row shards (no parts: finalize reads none)."""
    from pipeline.io.columns import schema_signature
    from pipeline.io.commit import ShardCommit, commit_key, data_key
    from pipeline.io.parts import OUTPUT_SCHEMA

    run_dir = os.path.join(folder, f"run-{shards}")
    os.makedirs(os.path.join(run_dir, "_commits"))
    columns = schema_signature(OUTPUT_SCHEMA)
    for shard in range(shards):
        commit = ShardCommit(
            shard=shard, rows=64, error_rows=0, data_key=data_key(shard), errors_key=None,
            data_bytes=180_000 + shard % 997, errors_bytes=0, data_sha256=f"{shard:064x}", errors_sha256=None,
            tokens=24_000, denoising_steps=3_100, canvases=128, filtered=0, finish_reasons={"eos": 60, "length": 4},
            errors_by_stage={}, worker=f"w{shard % 64}", attempt=1, wall_s=41.5, committed_at=1.8e9 + shard,
            columns=columns, started_at=1.8e9 + shard - 41.5,
        )  # fmt: skip
        with open(os.path.join(run_dir, commit_key(shard)), "w", encoding="utf-8") as f:
            f.write(commit.to_json())
    return run_dir


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    parser.add_argument("--shards", type=positive_int, nargs="+", default=[10_000, 50_000, 150_000])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "finalize.jsonl"))
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    results = []
    header = (
        f"{'shards':>8} {'read s':>7} {'finalize s':>10} {'manifest MB':>11} {'peak MB':>8} {'B/shard':>8}"
    )
    with tempfile.TemporaryDirectory(prefix="canvasflow-bench-finalize-") as folder:
        baseline = probe(PROBE, write_markers(folder, 100))["peak_rss_mb"]
        print(f"baseline (100 shards): {baseline:.0f} MB\n{header}")
        for shards in args.shards:
            m = probe(PROBE, write_markers(folder, shards))
            assert m["shards"] == shards, m
            row = {
                "benchmark": "finalize",
                "shards": shards,
                "read_s": round(m["read_s"], 2),
                "finalize_s": round(m["finalize_s"], 2),
                "manifest_mb": round(m["manifest_mb"], 1),
                "peak_rss_mb": round(m["peak_rss_mb"], 1),
                "baseline_rss_mb": round(baseline, 1),
                "bytes_per_shard": round((m["peak_rss_mb"] - baseline) * 1e6 / shards),
            }
            results.append(row)
            print(
                f"{shards:>8,} {row['read_s']:>7.2f} {row['finalize_s']:>10.2f} {row['manifest_mb']:>11.1f} "
                f"{row['peak_rss_mb']:>8.0f} {row['bytes_per_shard']:>8,}"
            )
    record(args.results, results, skip=args.no_record)
    return results


if __name__ == "__main__":
    main()
