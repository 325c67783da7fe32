"""What reading the input costs the driver: rows per second and peak memory of `read_input`, per format and size.

The driver reads the whole input before it plans shards (the run id and the resume check need the content's
fingerprint and every row's id), so what it holds per row bounds the input one run can take. The records
themselves are memory-mapped from a spill file under TMPDIR (page cache, not counted here; "table MB" is its
size). Each measurement runs in a
fresh process, so the peak resident memory (VmHWM, Linux) is that read's alone; bytes per row count what it holds
above a read of 100 rows of the same format (imports, allocator pools).

    python benchmarks/bench_read_input.py                      # 100k and 1M rows, JSONL and Parquet
    python benchmarks/bench_read_input.py --rows 10000 --no-record
    python benchmarks/bench_read_input.py --rows 200000 --shape chat --no-record

--shape picks what each row holds: `prompt` (default) a prompt column; `chat` a messages column of a system
and a user turn (data.messages_column); `template` two columns that data.prompt_template fills, a string and a
number. The rows of a shape other than the default are recorded with a "shape" key.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import PEAK_RSS_MB, positive_int, probe, record  # noqa: E402

PROBE = """
import json, sys, time
from pipeline.config.schema import DataConfig
from pipeline.data.readers import read_input
path = sys.argv[1]
options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
started = time.perf_counter()
records = read_input(DataConfig(path=path, **options))
print(json.dumps({
    "seconds": time.perf_counter() - started,
    "rows": records.num_rows,
    "table_mb": records.table.nbytes / 1e6,
    "peak_rss_mb": PEAK_RSS_MB,
}))
""".replace("PEAK_RSS_MB", PEAK_RSS_MB)

SHAPES = ("prompt", "chat", "template")
# The DataConfig options that read each shape's rows.
SHAPE_OPTIONS = {
    "prompt": {},
    "chat": {"messages_column": "messages"},
    "template": {"prompt_template": "Write a short story of {n} words about {topic}"},
}
SYSTEM = "You are a helpful writer of short stories."


def write_inputs(folder: str, rows: int, seed: int = 0, shape: str = "prompt") -> dict[str, str]:
    """A JSONL file and a Parquet file of the same `rows` prompts (~230 bytes each, plus a metadata column),
    as `shape` holds them (SHAPES)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ["a", "cat", "dog", "moon", "river", "city", "robot", "quietly", "under", "bright"]
    prompts = [
        "Write a short story about " + " ".join(rng.choice(words) for _ in range(40)) for _ in range(rows)
    ]
    if shape == "chat":
        columns = {
            "messages": [
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts
            ]
        }
    elif shape == "template":
        columns = {"topic": [p.removeprefix("Write a short story about ") for p in prompts]}
        columns["n"] = [100 + i % 900 for i in range(rows)]
    else:
        columns = {"prompt": prompts}
    columns["k"] = list(range(rows))
    suffix = "" if shape == "prompt" else f"-{shape}"
    jsonl = os.path.join(folder, f"in-{rows}{suffix}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({name: values[i] for name, values in columns.items()}) + "\n")
    parquet = os.path.join(folder, f"in-{rows}{suffix}.parquet")
    pq.write_table(pa.table(columns), parquet)
    return {"jsonl": jsonl, "parquet": parquet}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    parser.add_argument("--rows", type=positive_int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "read_input.jsonl"))
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("--shape", choices=SHAPES, default="prompt", help="what each row holds (see above)")
    parser.add_argument("--formats", choices=("jsonl", "parquet"), nargs="+", default=["jsonl", "parquet"])
    args = parser.parse_args(argv)

    results = []
    header = f"{'format':8} {'rows':>10} {'file MB':>8} {'s':>7} {'rows/s':>9} {'table MB':>9} {'peak MB':>8} {'B/row':>7}"
    options = json.dumps(SHAPE_OPTIONS[args.shape])
    with tempfile.TemporaryDirectory(prefix="canvasflow-bench-read-") as folder:
        baselines = {
            fmt: probe(PROBE, path, options)["peak_rss_mb"]
            for fmt, path in write_inputs(folder, 100, shape=args.shape).items()
            if fmt in args.formats
        }
        print(f"baseline (100 rows): {', '.join(f'{k} {v:.0f} MB' for k, v in baselines.items())}\n{header}")
        for rows in args.rows:
            for fmt, path in write_inputs(folder, rows, shape=args.shape).items():
                if fmt not in args.formats:
                    continue
                baseline = baselines[fmt]
                m = probe(PROBE, path, options)
                assert m["rows"] == rows, (path, m)
                extra = m["peak_rss_mb"] - baseline
                row = {
                    "benchmark": "read_input",
                    "format": fmt,
                    **({} if args.shape == "prompt" else {"shape": args.shape}),
                    "rows": rows,
                    "file_mb": round(os.path.getsize(path) / 1e6, 1),
                    "seconds": round(m["seconds"], 2),
                    "rows_per_s": round(rows / m["seconds"]),
                    "table_mb": round(m["table_mb"], 1),
                    "peak_rss_mb": round(m["peak_rss_mb"], 1),
                    "baseline_rss_mb": round(baseline, 1),
                    "bytes_per_row": round(extra * 1e6 / rows),
                }
                results.append(row)
                print(
                    f"{fmt:8} {rows:>10,} {row['file_mb']:>8.1f} {row['seconds']:>7.2f} {row['rows_per_s']:>9,} "
                    f"{row['table_mb']:>9.1f} {row['peak_rss_mb']:>8.0f} {row['bytes_per_row']:>7,}"
                )
    record(args.results, results, skip=args.no_record)
    return results


if __name__ == "__main__":
    main()
