"""The sampler's pace while another thread of its process runs Python, at Python's default GIL switch interval
(5 ms) and at the one canvasflow's workers set (pipeline/runner/stream.py WORKER_SWITCH_INTERVAL_S).

A worker runs its sampler in one thread and the shards in flight in others: their chat templates and
tokenization, the decoding of finished rows, the postprocess callable and the Parquet commit are Python. Each
torch call of the sampler's step releases the GIL and must take it back; while another thread runs Python, it
gets it back only when that thread's switch interval ends. Neighbours measured:
  none      the sampler alone;
  shard     the worker's own per-row Python: the shipped tiny model's chat template, tokenization, decoding;
  python    pure Python that never releases the GIL (a postprocess callable doing string work).
Reported: ms per decoder step (a fixed number of steps: adaptive stopping off) and the neighbour's iterations/s
(what the shorter interval costs it). Needs torch and transformers only.

    python benchmarks/bench_gil.py                  # CPU, about 2 minutes
    python benchmarks/bench_gil.py --device cuda --rows 32
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_batching import build_model, workload  # noqa: E402
from benchmarks.common import append_results, positive_int  # noqa: E402
from pipeline.runner.stream import WORKER_SWITCH_INTERVAL_S  # noqa: E402
from pipeline.sampler.engine import DiffusionSampler  # noqa: E402
from pipeline.sampler.settings import SamplerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gil.jsonl"
DEFAULT_SWITCH_INTERVAL_S = 0.005  # CPython's


def shard_work():
    """One row of a shard's Python work: chat template, tokenization and decoding with the shipped tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "pipeline" / "assets" / "tiny-diffusiongemma")
    lines = (ROOT / "pipeline" / "assets" / "prompts" / "prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    state = {"i": 0}

    def one() -> None:
        prompt = prompts[state["i"] % len(prompts)]
        state["i"] += 1
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
        tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)

    return one


def python_work():
    def one() -> None:
        words = " ".join(str(i * i) for i in range(200)).split()
        sum(len(w) for w in words if w.startswith("1"))

    return one


class Neighbour:
    """Runs `work` in a loop in a daemon thread until stopped; counts iterations."""

    def __init__(self, work) -> None:
        self.work, self.count, self._stop = work, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.work()
            self.count += 1

    def __enter__(self) -> Neighbour:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rate = self.count / (time.perf_counter() - self.started)


def measure(sampler: DiffusionSampler, requests, sync) -> tuple[float, int]:
    sampler.stats = type(sampler.stats)()
    sync()
    started = time.perf_counter()
    sampler.generate(requests)
    sync()
    return time.perf_counter() - started, sampler.stats.decoder_calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=4, help="rows, all in one batch")
    parser.add_argument("--steps", type=positive_int, default=6, help="decoder steps per canvas (fixed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--neighbours",
        nargs="+",
        default=["shard", "python"],
        help="threads beside the sampler (none: alone, always run)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "canvasflow" / "bench")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    kinds = {"none": None, "shard": shard_work, "python": python_work}
    unknown = [n for n in args.neighbours if n not in kinds]
    if unknown:
        parser.error(f"--neighbours {unknown[0]!r} is not one of {', '.join(kinds)}")
    neighbours = [
        "none",
        *(n for n in dict.fromkeys(args.neighbours) if n != "none"),
    ]  # alone first: the baseline
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.cache, 10.0, args.device, dtype)
    settings = SamplerSettings(
        max_new_tokens=32, max_denoising_steps=args.steps, t_min=0.4, t_max=0.8, entropy_bound=0.1,
        stability_threshold=1, confidence_threshold=0.5, canvas_length=32, eos_token_ids=(1,), pad_token_id=0,
        adaptive_stopping=False,
    )  # fmt: skip
    sampler = DiffusionSampler(model, settings, max_batch=args.rows, max_prompt_tokens=48)
    requests = workload(args.rows, model.vocab_size, seed=0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sampler.generate(requests)  # warm-up: allocations, kernel choices, CUDA graphs
    before = sys.getswitchinterval()
    print(
        f"device {args.device}: {args.rows} rows x {args.steps} decoder steps, torch threads {args.threads}"
    )
    print(f"{'switch interval':>16}{'neighbour':>11}{'ms/step':>9}{'slowdown':>10}{'neighbour it/s':>16}")
    records, alone = [], {}
    try:
        for interval in (DEFAULT_SWITCH_INTERVAL_S, WORKER_SWITCH_INTERVAL_S):
            sys.setswitchinterval(interval)
            for name in neighbours:
                if kinds[name] is None:
                    wall, steps = measure(sampler, requests, sync)
                    rate = None
                else:
                    with Neighbour(kinds[name]()) as neighbour:
                        wall, steps = measure(sampler, requests, sync)
                    rate = neighbour.rate
                ms = 1000 * wall / steps
                if name == "none":
                    alone[interval] = ms
                slowdown = ms / alone[interval]
                print(
                    f"{interval * 1000:>13.1f} ms{name:>11}{ms:>9.1f}"
                    f"{f'{slowdown:.1f}x':>10}{'-' if rate is None else f'{rate:.0f}':>16}"
                )
                records.append(
                    {
                        "bench": "gil",
                        "device_arg": args.device,
                        "rows": args.rows,
                        "threads": args.threads,
                        "switch_interval_s": interval,
                        "neighbour": name,
                        "ms_per_step": ms,
                        "slowdown": slowdown,
                        "neighbour_per_s": rate,
                    }  # fmt: skip
                )
    finally:
        sys.setswitchinterval(before)
    if not args.no_record:
        append_results(str(RESULTS), records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
