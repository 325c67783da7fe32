"""One sampler, several shards: a worker's rows stream across shard ends.

Run one shard at a time and every shard ends with its batch draining: as its last rows finish, their slots
stay empty, for nothing is left to admit (benchmarks/bench_shard_size.py measures the cost). A worker that
holds several shards (run.shards_in_flight; Ray calls `ShardWorker.process` from that many threads) instead
hands their rows to one sampler, running in this module's thread: a finished row's slot goes to the next
queued row whichever shard it belongs to, and the batch stays full until the worker's last shard. Each
`process` call still waits for its own shard's rows only, then writes and commits that shard while the
sampler goes on with the others.

Rows are in the sampler's hands in the order the shards arrived. A failure inside the sampler (a device
error, a bug) fails every shard with rows in it (every queued shard, if it failed before taking a row), each
in its own `process` call; the thread then serves the shards still queued and those that come next.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# The GIL switch interval of a worker process (sys.setswitchinterval; Python's default is 5 ms). Every torch call
# of the sampler's step releases the GIL and must take it back; while another thread of the worker runs Python
# (a shard's chat templates and tokenization, its decoding, a postprocess callable, the Parquet commit), each
# take-back waits for that thread's interval to end. At 5 ms that turns a 7 us operation into 5 ms. The interval
# cannot cut short a C call that holds the GIL (a tokenizer's), only Python bytecode (benchmarks/bench_gil.py,
# docs/cluster.md).
WORKER_SWITCH_INTERVAL_S = 2e-4


class Pending:
    """One caller's rows in the shared sampler: their results by position, filled as they finish."""

    def __init__(self, count: int, on_result: Callable[[Any], None] | None) -> None:
        self.results: list[Any] = [None] * count
        self.left = count
        self.on_result = on_result
        self.error: BaseException | None = None
        self.done = threading.Event()
        if not count:
            self.done.set()

    def wait(self) -> list[Any]:
        """The results in request order, once all are there; raises what the sampler raised instead."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.results


class SharedSampler:
    """Runs `sampler.serve` in a daemon thread over the requests of every caller in flight."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self._cond = threading.Condition()
        self._queue: deque[Any] = deque()  # requests not yet taken by the sampler
        self._owner: dict[int, tuple[Pending, int]] = {}  # id(request) -> (its caller, its position)
        self._running: dict[int, Pending] = {}  # callers with rows taken by the sampler and not all finished
        self._thread: threading.Thread | None = None

    def run(self, requests: Sequence[Any], on_result: Callable[[Any], None] | None = None) -> list[Any]:
        """Results of `requests` in their order, generated alongside other callers' rows; `on_result` is
        called (in the sampler's thread) as each finishes. Raises what the sampler raised while it held them."""
        return self.submit(requests, on_result).wait()

    def submit(self, requests: Sequence[Any], on_result: Callable[[Any], None] | None = None) -> Pending:
        """Queues `requests` behind those already queued, and returns at once."""
        pending = Pending(len(requests), on_result)
        with self._cond:
            for position, request in enumerate(requests):
                self._owner[id(request)] = (pending, position)
            self._queue.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="canvasflow-sampler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return pending

    # The sampler's side (pipeline/sampler/feed.py), called in its thread.
    def pull(self, count: int, wait: bool) -> list[Any]:
        with self._cond:
            while wait and not self._queue:
                self._cond.wait()
            taken = [self._queue.popleft() for _ in range(min(count, len(self._queue)))]
            for request in taken:
                pending = self._owner[id(request)][0]
                self._running[id(pending)] = pending
            return taken

    def _finished(self, request, result) -> None:
        with self._cond:
            pending, position = self._owner.pop(id(request))
        pending.results[position] = result
        if pending.on_result is not None and pending.error is None:
            try:
                pending.on_result(result)
            except Exception as e:  # noqa: BLE001 - the caller's callback fails the caller, not the sampler
                pending.error = e
        pending.left -= 1
        if not pending.left:
            with self._cond:
                self._running.pop(id(pending), None)
            pending.done.set()

    def _serve(self) -> None:
        while True:
            try:
                self.sampler.serve(self, on_result=self._finished)
            except BaseException as e:  # noqa: BLE001 - handed to every caller whose rows it held
                self._fail_running(e)

    def _fail_running(self, error: BaseException) -> None:
        """Fails the callers with rows in the sampler (their queued rows go too); the others' rows stay
        queued for the next try. An error met before any row was taken (a cache that does not fit the
        device) fails every caller: the sampler cannot run, and retrying at once would spin. Either way the
        next try waits for rows to be queued."""
        with self._cond:
            failed = list(self._running.values()) or list(
                {id(p): p for p, _ in self._owner.values()}.values()
            )
            self._running.clear()
            gone = {id(p) for p in failed}
            self._queue = deque(r for r in self._queue if id(self._owner[id(r)][0]) not in gone)
            self._owner = {k: v for k, v in self._owner.items() if id(v[0]) not in gone}
        logger.warning("the sampler failed with rows of %d shard(s) in it: %r", len(failed), error)
        for pending in failed:
            pending.error = error
            pending.done.set()
        with self._cond:
            while not self._queue:
                self._cond.wait()
