"""What secret redaction costs: redact_text (every line Hydra prints before a job starts: `--cfg job`, a compose
error echoing an override) and without_userinfo (error messages) on adversarial and realistic texts, at two
sizes, so that the growth with length shows (x4 the text should take about x4 the time, not x16).

Texts that once took quadratic time (f6bb548, c379e43): a long word after an override (55 s at 100 KB), a
dashed word (28 s), unclosed brackets (43 s), URLs without '@' (4.7 s), and a 10 MB `--cfg job` (90 s).

    python benchmarks/bench_redaction.py                # about 10 s
    python benchmarks/bench_redaction.py --no-record
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import record  # noqa: E402
from pipeline.config.redact import redact_text  # noqa: E402
from pipeline.config.validate import without_userinfo  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "redaction.jsonl")

# name -> (function, the text of about 100 KB); each is measured at x1 and x4
CASES = {
    "long word after an override": (redact_text, "data.hf_kwargs.prompt=" + "x" * 100_000),
    "dashed word": (redact_text, "a-" * 50_000),
    "unclosed brackets": (redact_text, "token=[\n" * 12_500),
    "key=value pairs": (redact_text, "a=" * 50_000),
    "cfg job lines": (redact_text, "".join(f"  field_{i}: value {i}\n" for i in range(5_000))),
    "urls without @": (without_userinfo, "http://" * 14_285),
    "urls with a colon": (without_userinfo, "http://a:" * 11_111),
    "dashed word (urls)": (without_userinfo, "a-" * 50_000),
}


def seconds(function, text: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args()
    rows = []
    print(f"{'text':30} {'function':18} {'KB':>6} {'ms':>9} {'KB x4 ms':>9} {'growth':>7}")
    for name, (function, text) in CASES.items():
        one, four = seconds(function, text), seconds(function, text * 4)
        row = {
            "benchmark": "redaction",
            "text": name,
            "function": function.__name__,
            "kb": round(len(text) / 1000, 1),
            "ms": round(one * 1000, 3),
            "ms_x4": round(four * 1000, 3),
            "growth": round(four / one, 2) if one else None,
        }
        rows.append(row)
        print(
            f"{name:30} {function.__name__:18} {row['kb']:>6} {row['ms']:>9.2f} {row['ms_x4']:>9.2f} "
            f"{row['growth'] if row['growth'] is not None else '-':>7}"
        )
    big = (
        "postprocess:\n"
        + "".join(f"  field_{i}: value {i}\n" for i in range(200_000))
        + "  token: hf_SECRET\n"
    )
    whole = seconds(redact_text, big, repeats=1)
    print(f"a {len(big) / 1e6:.1f} MB --cfg job output: {whole:.2f} s")
    rows.append(
        {"benchmark": "redaction", "text": "cfg job", "mb": round(len(big) / 1e6, 1), "s": round(whole, 3)}
    )
    record(RESULTS, rows, skip=args.no_record)


if __name__ == "__main__":
    main()
