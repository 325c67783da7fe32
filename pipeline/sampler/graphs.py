"""The decoder step as CUDA graphs, one per (bucketed batch size, attention read length).

Launching the step's hundreds of small kernels from Python leaves the GPU waiting on the host; a captured
graph replays them with one launch. Batches are padded to the next bucket (powers of two and `max_batch`):
padding rows are free slots with an empty, valid state (see engine._compact), computed and ignored. Capture
needs warm-up runs (Triton compiles, cuBLAS picks algorithms), which would advance the rows' state, so the
state is saved before and restored after. Any failure to capture logs one warning and the sampler goes on
eagerly: a graph is an optimisation, never a reason for a job to fail.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
WARMUP_STEPS = 2


def buckets_for(max_batch: int) -> list[int]:
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def make_step_graphs(sampler, mode: str) -> StepGraphs | None:
    if mode not in ("auto", "off", "eager"):
        raise ValueError(f"step_graphs={mode!r} is not one of auto, off, eager")
    if mode == "off" or not sampler.draws.keyed:  # the torch-global test mode draws on the host's generator
        return None
    if mode == "auto" and sampler.device.type != "cuda":
        return None
    return StepGraphs(sampler, buckets_for(sampler.max_batch), capture=mode == "auto")


class StepGraphs:
    def __init__(self, sampler, buckets: list[int], *, capture: bool) -> None:
        self.sampler = sampler
        self.buckets = buckets
        self.capture = capture
        self.graphs: dict[tuple[int, int | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, active: int) -> int:
        return next(b for b in self.buckets if b >= active)

    def run(self, active: int, bucket: int, kv_limit: int | None) -> torch.Tensor:
        """Stop flags [active] of one step computed at the bucket's batch size."""
        if not self.capture:
            return self.sampler._step(bucket, None, kv_limit)[:active]
        entry = self.graphs.get((bucket, kv_limit)) or self._capture(bucket, kv_limit)
        if entry is None:
            return self.sampler._step(active, None, kv_limit)
        graph, stop = entry
        graph.replay()
        return stop[:active]

    def _capture(self, bucket: int, kv_limit: int | None):
        sp = self.sampler
        saved = {name: t[:bucket].clone() for name, t in sp._state.items()}

        def restore() -> None:
            for name, t in saved.items():
                sp._state[name][:bucket].copy_(t)

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    sp._step(bucket, None, kv_limit)
            torch.cuda.current_stream().wait_stream(side)
            restore()
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                stop = sp._step(bucket, None, kv_limit)
            restore()
        except Exception as e:  # noqa: BLE001 - graphs are an optimisation; fall back to eager steps
            torch.cuda.synchronize()
            restore()
            self.capture = False
            logger.warning("CUDA graph capture of the decoder step failed (%s); running it eagerly", e)
            return None
        logger.info(
            "captured the decoder step as a CUDA graph: batch %d, attention over %s slots positions",
            bucket,
            kv_limit,
        )
        self.graphs[(bucket, kv_limit)] = (graph, stop)
        return graph, stop
