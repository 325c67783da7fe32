"""Helpers shared by the benchmark scripts: CUDA-event timing with quantiles, the device's measured matmul
rate, peak extra memory, and results appended as JSON lines tagged with device, commit, date and versions.

Needs only torch (triton optional). Typical use:

    require_cuda("bench_x.py")
    rate = matmul_tflops()                                   # measured bf16 TFLOP/s of this device
    timing = cuda_time(lambda: op(x))                        # {"median_ms", "q20_ms", "q80_ms", "min_ms"}
    _, extra = peak_extra_memory(lambda: op(x))              # bytes above what was allocated before
    append_results("benchmarks/results/x.jsonl", [{"path": "triton", **timing}])
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

QUANTILES = (0.2, 0.5, 0.8)


def positive_int(text: str) -> int:
    """argparse type of the size arguments (rows, batches, shards, steps): an integer >= 1; anything else is a
    usage error naming the value (argparse: "invalid positive_int value: '0'"), before anything runs."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def require_cuda(script: str) -> None:
    """Exits with a clear message when no CUDA device is visible."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA device (torch.cuda.is_available() is False); nothing was measured.")


def cuda_time(
    fn: Callable[[], Any], *, warmup: int = 3, reps: int = 10, quantiles: Iterable[float] = QUANTILES
) -> dict[str, float]:
    """Milliseconds per call of `fn` from CUDA events around each of `reps` calls, after `warmup` calls.

    Returns {"median_ms", "min_ms", "q<p>_ms" for each quantile p (in percent)}; the device is synchronised
    before and after, so queued work does not leak into the first measurement.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], dtype=torch.float64)
    out = {"median_ms": times.median().item(), "min_ms": times.min().item()}
    for q in quantiles:
        out[f"q{round(q * 100)}_ms"] = torch.quantile(times, q).item()
    return out


def wall_time(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 3) -> dict[str, float]:
    """cuda_time's figures from the host's clock, for the CPU smoke runs of the GPU benchmarks."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    times.sort()

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"median_ms": pick(0.5), "min_ms": times[0], "q20_ms": pick(0.2), "q80_ms": pick(0.8)}


def matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192, reps: int = 20) -> float:
    """Measured rate of a large square torch.mm on the current device, in TFLOP/s (2 size**3 per product)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    timing = cuda_time(lambda: torch.mm(a, b), warmup=5, reps=reps)
    return 2 * size**3 / (timing["median_ms"] * 1e-3) / 1e12


def peak_extra_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), bytes): the peak of torch.cuda.max_memory_allocated during the call minus what was allocated
    before it, i.e. the transient memory of `fn` beyond its inputs (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


# A Python expression for the peak resident memory of the process evaluating it, in MB (Linux): VmHWM, this
# process image's own peak (ru_maxrss would keep the parent's peak across fork and exec). For PROBE scripts.
PEAK_RSS_MB = 'int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1e3'


def probe(code: str, *args: str) -> dict[str, Any]:
    """Runs `code` (Python, which prints a JSON object as its last line) in a fresh interpreter at the checkout's
    root with `args` as sys.argv[1:], and returns that object: a measurement of its own, memory included."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def record(path: str, rows: list[dict[str, Any]], *, skip: bool) -> None:
    """Appends `rows` to the results file `path` (append_results) and says so, unless `skip` (--no-record)."""
    if not skip:
        append_results(path, rows)
        print(f"appended {len(rows)} rows to {path}")


def environment(checkout: str | None = None) -> dict[str, Any]:
    """Device name, git commit of `checkout` (default: this one; outside a checkout $CANVASFLOW_COMMIT, if
    set) and whether tracked files differ from it (None outside a checkout), UTC date, torch and triton
    versions. `dirty` tells a row measured on uncommitted changes from one measured on `commit`."""
    here = checkout or os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    commit = commit or os.environ.get("CANVASFLOW_COMMIT")  # a copy without .git (the GPU machine's)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def append_results(path: str, rows: Iterable[dict[str, Any]]) -> None:
    """Appends one JSON line per row to `path` (directories created), each merged with environment()."""
    env = environment()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
