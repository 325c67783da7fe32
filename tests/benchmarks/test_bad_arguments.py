"""A size argument of 0 or below given to a CPU benchmark: argparse's usage error naming the value, exit 2,
nothing measured and no traceback (it failed deep inside the run: range() arg 3, max_batch=0, a probe's
CalledProcessError)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [
        ["benchmarks/bench_shard_size.py", "--shards", "0", "--no-record"],
        ["benchmarks/bench_shard_size.py", "--batches", "8", "-1", "--no-record"],
        ["benchmarks/bench_read_input.py", "--rows", "0", "--no-record"],
        ["benchmarks/bench_finalize.py", "--shards", "0", "--no-record"],
        ["benchmarks/bench_batching.py", "--batch", "0"],
        ["benchmarks/bench_mask_cache.py", "--rows-per-task", "0"],
        ["benchmarks/bench_mask_decide.py", "--rows", "0", "--no-record"],
    ],
)
def test_a_size_below_one_is_a_usage_error(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    bad = next(a for a in argv[1:] if a.lstrip("-").isdigit() and int(a) < 1)
    assert f"invalid positive_int value: '{bad}'" in proc.stderr
    assert "Traceback" not in proc.stderr
