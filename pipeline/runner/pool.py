"""A fixed pool of shard workers: dispatch, bounded retries, worker replacement.

Each worker (Ray actor) holds up to run.shards_in_flight shards at a time. A shard whose worker dies
(process killed, node lost), whose processing raises, or which is still running after `shard_timeout_s` (a
hung worker: a stuck device, a deadlock, a storage call that never returns) is queued again, up to
`max_attempts` attempts; a dead or hung worker, or one whose device failed (a CUDA error, after which every
call on it fails), is killed and replaced by a new one (which loads the model again, so a replacement's first
shard also gets the worker start-up time). A shard that kills its worker on every attempt has the rows that
do searched for (pipeline/runner/isolate.py) and is committed without them, as error rows; it then gets
`max_attempts` attempts again, and is given up on, not searched twice, if it still kills its worker alone.
Shards that keep failing otherwise are returned with their last error; the others are unaffected. Once a
shard fails because the output location refuses writes for good (a full disk, a read-only file system, denied
access: StoreError.refused), no more shards start: those in flight finish, and the rest are returned as failed,
for a rerun once the location can be written again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.runner.isolate import RowSearch

logger = logging.getLogger(__name__)


@dataclass
class ShardTask:
    shard: int
    start: int  # first record (row of the record table)
    stop: int
    attempts: int = 0
    last_error: str | None = None
    shared: bool = False  # whether its current attempt shared its worker with another shard
    alone: bool = False  # runs on a worker that holds nothing else: a retry, a probe
    probe: bool = False  # a piece of a shard whose failing rows are searched for: generated, not committed
    skip: dict[int, str] = field(default_factory=dict)  # record index -> reason: an error row, not generated
    searched: bool = False  # its failing rows were searched for (and are in `skip`)
    searched_at: int = 0  # its attempts when the search ended: it then gets max_attempts more
    refused: bool = False  # its last attempt failed because the output location refuses writes for good

    @property
    def tries(self) -> int:
        """Attempts counted against max_attempts: those since its search, if it had one."""
        return self.attempts - self.searched_at


class WorkerStartError(RuntimeError):
    """A worker could not start (e.g. the model failed to load)."""


class WorkerNotStarted(RuntimeError):
    """Raised by every call on a worker whose start failed with an error that is the user's to fix (a model that
    does not load, a postprocess that does not import: ShardWorker keeps it rather than letting its __init__
    raise, which Ray logs with the actor's whole traceback on the driver's console). `error`: that error in one
    line (`describe`); `traceback`: its traceback, which the driver logs at debug level (start_workers)."""

    def __init__(self, error: str, traceback: str = "") -> None:
        super().__init__(error, traceback)
        self.error, self.traceback = error, traceback

    def __str__(self) -> str:
        return self.error


def describe(error: BaseException) -> str:
    """`error`'s type and its message's first line, as torch's CUDA errors follow theirs with lines of advice,
    the last of which names no error."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    lines = str(error).strip().splitlines()
    return f"{name}: {lines[0]}"[:500] if lines else name


def start_failed(error: BaseException) -> WorkerNotStarted | None:
    """The WorkerNotStarted that a worker's call raised (a Ray task error wraps it), or None."""
    cause = getattr(error, "cause", None) or error
    return cause if isinstance(cause, WorkerNotStarted) else None


def _short(error: BaseException) -> str:
    """One line naming `error`, for the log and an error row's reason. A call that raised in a worker (a Ray task
    error, whose text is the worker's traceback) by the worker's exception (`describe`); a worker that did not
    start by the error it kept (WorkerNotStarted)."""
    not_started = start_failed(error)
    if not_started is not None:
        return not_started.error[:500]
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
        return describe(cause)
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else type(error).__name__


# Errors after which a CUDA context is lost: every later call on that device fails too (sticky errors).
DEVICE_FAILURES = (
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "uncorrectable ECC error",
)
# CUDA errors that leave the device usable: an allocation that failed ("CUDA error: out of memory",
# cuBLAS/cuDNN's *_STATUS_ALLOC_FAILED), retried on the same worker as any other error.
NOT_DEVICE_FAILURES = ("out of memory", "STATUS_ALLOC_FAILED")


NOT_STARTED = "not started: "  # the last_error of a shard left unrun once the output location refused writes


def output_refused(error: BaseException) -> bool:
    """Whether `error`, raised by a worker's call, is the output location refusing writes for good (a full disk,
    a read-only file system, denied access: StoreError.refused): every shard would fail the same way."""
    from pipeline.io.store import StoreError

    cause = getattr(error, "cause", None) or error  # a Ray task error wraps the worker's exception
    return isinstance(cause, StoreError) and getattr(cause, "refused", False)


def device_failed(error: BaseException) -> bool:
    """Whether `error`, raised by a worker's call, left the worker's device unusable (torch raises
    AcceleratorError for CUDA errors, older versions a RuntimeError saying "CUDA error"): such a worker fails
    every shard it gets, at once, so it must be replaced as a dead one is. Out-of-memory is not one of them."""
    cause = getattr(error, "cause", None) or error  # a Ray task error wraps the worker's exception
    text = str(cause)
    if any(marker in text for marker in NOT_DEVICE_FAILURES):
        return False
    if any(c.__name__ == "AcceleratorError" for c in type(cause).__mro__):
        return True
    return any(marker in text for marker in DEVICE_FAILURES)


# Why an attempt of a shard did not commit: it raised, its worker died (or its device failed) while it ran, it
# ran past run.shard_timeout_s, or its worker (a replacement) never started.
FAILURE_REASONS = ("error", "worker_died", "device_failed", "timeout", "not_started")
START_REPLACEMENTS = 2  # per worker slot: a worker whose process died while it loaded the model is replaced


def start_workers(
    make_worker: Callable[[int], Any], count: int, timeout_s: float, options: dict[str, Any]
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Starts `count` workers (each loads the model) and waits until all are ready, at most `timeout_s`. A
    worker whose process died meanwhile (killed, out of memory, its node lost) is replaced, START_REPLACEMENTS
    times per slot; one whose model load raised is not (the error would repeat): WorkerStartError."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    workers = [make_worker(i) for i in range(count)]
    refs = [w.ready.remote() for w in workers]
    infos = []
    deadline = time.monotonic() + timeout_s
    for i in range(count):
        replaced = 0
        while True:
            try:
                infos.append(ray.get(refs[i], timeout=max(1.0, deadline - time.monotonic())))
                break
            except GetTimeoutError:
                # Free while the workers that did start hold theirs: "0 CPU free" alone read as a cluster busy
                # with other work when this job's own workers had taken it all; the totals say what is missing.
                free, total = ray.available_resources(), ray.cluster_resources()
                for w in workers:
                    ray.kill(w)
                cpus, gpus = float(options.get("num_cpus") or 0), float(options.get("num_gpus") or 0)
                raise WorkerStartError(
                    f"{count - i} of {count} workers did not start within cluster.worker_start_timeout_s="
                    f"{timeout_s:g}s. Each asks for {options.get('num_cpus')} CPU and {options.get('num_gpus')} GPU "
                    f"({count * cpus:g} CPU and {count * gpus:g} GPU for {count}); the cluster has "
                    f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU in all, {free.get('CPU', 0):g} CPU "
                    f"and {free.get('GPU', 0):g} "
                    "GPU free beside the workers that started. Lower cluster.num_workers, or wait for (or add) "
                    "nodes."
                ) from None
            except Exception as e:  # noqa: BLE001 - reported with the worker's own message
                died = isinstance(e, RayActorError) and not e.actor_init_failed
                not_started = start_failed(e)
                if not_started is not None:  # one line on the console; its traceback at debug level
                    logger.debug("worker %d failed to start:\n%s", i, not_started.traceback)
                if not died or replaced == START_REPLACEMENTS:
                    for w in workers:
                        ray.kill(w)
                    raise WorkerStartError(f"worker {i} failed to start: {_short(e)}") from None
                replaced += 1
                logger.warning(
                    "worker %d died while it started (%s): starting replacement %d of %d",
                    i,
                    _short(e),
                    replaced,
                    START_REPLACEMENTS,
                )
                with contextlib.suppress(Exception):
                    ray.kill(workers[i])
                workers[i] = make_worker(i)
                refs[i] = workers[i].ready.remote()
    return workers, infos


def run_pool(
    workers: list[Any],
    make_worker: Callable[[int], Any],
    tasks: list[ShardTask],
    records: Any,
    *,
    max_attempts: int,
    on_commit: Callable[[dict[str, Any]], None],
    on_tick: Callable[[], None],
    tick_s: float,
    shard_timeout_s: float | None = None,
    start_grace_s: float = 0.0,
    in_flight: int = 1,
    on_failure: Callable[[ShardTask, int, str], None] | None = None,
) -> list[ShardTask]:
    """Runs every task; returns the tasks that failed `max_attempts` times.

    Each worker holds up to `in_flight` shards (run.shards_in_flight; the worker streams their rows through
    one sampler, pipeline/runner/stream.py), every worker one before any gets a second. `shard_timeout_s`
    (None: no limit) bounds how long a worker holding shards goes without finishing one: one shard's time
    when it holds one, and its oldest shard is named as the one that hung (its shards share one sampler and
    commit one at a time, so none can be stuck while others finish); a replacement's shards wait for its model
    load: their clock starts once it is up, and gives up at `start_grace_s` more if it never is. A dead or hung
    worker takes every shard it held down with it, each charged an attempt; a retried shard runs alone on its
    worker, and a shard is given up on only once an attempt that ran alone failed too, never for another
    shard's fault. A shard whose last attempt alone killed its worker has its failing rows searched for
    (isolate.py): probes of its rows, dispatched first and alone, then the shard again with those rows in
    `skip` and `max_attempts` attempts of its own (one that kills its worker alone again is given up on, not
    searched twice). A
    replacement that failed to start, or had not started by its first shard's deadline, fails the shards it
    held as an error does: that says nothing about their rows, which are not searched.

    `on_failure(task, worker index, reason)` is called for each attempt of a shard that did not commit (not for
    a search's probes), reason one of FAILURE_REASONS.
    """
    import ray
    from ray.exceptions import RayActorError

    queue = deque(tasks)
    halted: list[str] = []  # why no more shards start: the output location refuses writes (output_refused)
    held: list[dict[Any, ShardTask]] = [{} for _ in workers]  # per worker: ref -> task, oldest first
    deadline = [float("inf")] * len(workers)  # of each worker's oldest shard
    fresh: set[int] = set()  # replacement workers not yet seen up (their model loaded)
    starting: dict[int, Any] = {}  # replacement workers not yet known to be up: their `ready` call
    failed: list[ShardTask] = []

    def give_up(task: ShardTask) -> None:
        logger.error(
            "shard %d failed %d times; giving up on it: %s", task.shard, task.attempts, task.last_error
        )
        failed.append(task)

    search = RowSearch(
        ways=len(workers),
        max_attempts=max_attempts,
        records=records,
        queue=queue.appendleft,
        give_up=give_up,
    )

    def start_clock(index: int) -> None:
        deadline[index] = float("inf")
        if held[index] and shard_timeout_s is not None:
            grace = start_grace_s if index in fresh else 0.0
            deadline[index] = time.monotonic() + shard_timeout_s + grace

    def room(index: int, alone: bool, skip_starting: bool) -> bool:
        if skip_starting and index in starting:
            return False
        if alone or any(t.alone for t in held[index].values()):
            return not held[index]
        return len(held[index]) < in_flight

    def dispatch() -> None:
        # A replacement not up yet (its node lost for good, no node with room for it, a model load that hangs)
        # gets nothing while a worker that is up can take the shard: given to it, the shard waited for its start,
        # up to run.shard_timeout_s + cluster.worker_start_timeout_s, beside idle workers.
        skip_starting = bool(starting) and any(started(i) for i in range(len(workers)))
        while queue and not halted:
            open_ = [i for i in range(len(workers)) if room(i, queue[0].alone, skip_starting)]
            if not open_:
                return
            index = min(open_, key=lambda i: (len(held[i]), i))
            task = queue.popleft()
            if task.probe and not search.wanted(task):
                continue
            task.attempts, task.shared = task.attempts + 1, False
            chunk = records.slice(task.start, task.stop - task.start)
            skip = {i - task.start: reason for i, reason in task.skip.items()}
            ref = workers[index].process.remote(task.shard, chunk, task.attempts, skip, task.probe)
            held[index][ref] = task
            if len(held[index]) == 1:
                start_clock(index)
            else:
                for other in held[index].values():
                    other.shared = True

    def done(task: ShardTask, result: dict[str, Any]) -> None:
        if task.probe:
            search.passed(task)
        else:
            on_commit(result)

    def settle(task: ShardTask, fatal: bool) -> None:
        """Queues a failed task again, unless it has had its attempts (the last one always ran alone); a shard
        that then killed its worker (`fatal`: dead or hung) has its failing rows searched for."""
        if task.probe:
            search.failed(task, fatal=fatal)
        elif task.tries < max_attempts or task.shared:
            time.sleep(min(2.0 ** (task.tries - 1), 10.0) * 0.1)
            task.alone = True
            queue.append(task)
        elif fatal and not task.searched:
            search.start(task)
        else:
            if fatal:  # its other rows passed in the search's pieces: a second search would find no more
                task.last_error = (
                    f"{task.last_error}; without the {len(task.skip)} row(s) its search found, it killed its "
                    f"worker again on {task.tries} attempt(s) alone, though its other rows passed in the "
                    "search's smaller pieces: they fail only together (e.g. a batch that runs out of memory: "
                    "lower sampler.batch_size and rerun the same command); not searched again"
                )
            give_up(task)

    def started(index: int) -> bool:
        """Whether worker `index` is up (its model loaded): a replacement whose start failed or has not ended
        (a device gone for good, a load that hangs) fails every call it is given, whatever its rows."""
        if index not in starting:
            return True
        finished, _ = ray.wait([starting[index]], num_returns=1, timeout=0)
        if not finished:
            return False
        try:
            ray.get(finished[0])
        except Exception:  # noqa: BLE001 - it failed to start
            return False
        del starting[index]
        return True

    def replace(index: int, error: str, fatal: bool = True) -> list[ShardTask]:
        """Kills worker `index`, starts its replacement, and retries the shards it held but had not finished
        (one it finished in the meantime is taken as done); returns those. `fatal`: the worker died or hung
        while running them (not when it never started), so one of them may hold a row that kills workers."""
        if held[index]:
            finished, _ = ray.wait(list(held[index]), num_returns=len(held[index]), timeout=0)
            for ref in finished:
                with contextlib.suppress(Exception):  # failed too: retried with the others
                    done(held[index][ref], ray.get(ref))
                    del held[index][ref]
        lost = list(held[index].values())
        held[index].clear()
        ray.kill(workers[index])
        workers[index] = make_worker(index)
        starting[index] = workers[index].ready.remote()
        fresh.add(index)
        deadline[index] = float("inf")
        for task in lost:
            task.last_error = error
            settle(task, fatal=fatal)
        return lost

    def lost_attempts(tasks: list[ShardTask], index: int, reason: str) -> None:
        for task in tasks:
            if on_failure is not None and not task.probe:
                on_failure(task, index, reason)

    def attempt(task: ShardTask) -> str:
        if task.probe:
            return f"rows {task.start}-{task.stop - 1}, attempt {task.attempts}/{max_attempts}, not committed"
        if task.searched:
            return f"attempt {task.tries}/{max_attempts}: without its {len(task.skip)} failing row(s)"
        if task.attempts <= max_attempts:
            return f"attempt {task.attempts}/{max_attempts}"
        return f"attempt {task.attempts}: one beyond run.max_shard_attempts={max_attempts}, alone, as an earlier one shared its worker"

    def also_held(lost: list[ShardTask], culprit: ShardTask) -> str:
        shards = ", ".join(str(t.shard) for t in lost if t is not culprit)
        return f" (shard(s) {shards} it also held are retried)" if shards else ""

    while (queue and not halted) or any(held):
        dispatch()
        owner = {ref: i for i, refs in enumerate(held) for ref in refs}
        ready, _ = ray.wait(list(owner), num_returns=1, timeout=tick_s)
        on_tick()
        for ref in ready:
            index = owner[ref]
            task = held[index].pop(ref)
            try:
                done(task, ray.get(ref))
            except Exception as e:  # noqa: BLE001 - the shard failed inside the worker, or the worker died
                # A replacement whose start failed with the user's error (WorkerNotStarted) stands as one whose
                # start raised in Ray (an actor that died at its creation): its worker failed to start.
                dead = isinstance(e, RayActorError) or start_failed(e) is not None
                if dead or device_failed(e):
                    # A replacement that never started failed the call whatever its rows: an error, not a death
                    # to search the rows for (the search would make good rows error rows).
                    up = started(index) and start_failed(e) is None
                    what = (
                        ("worker died" if up else "its worker failed to start")
                        if dead
                        else "its device failed"
                    )
                    task.last_error = f"{what}: {_short(e)}"
                    reason = ("worker_died" if up else "not_started") if dead else "device_failed"
                    lost = sorted([task, *replace(index, task.last_error, fatal=up)], key=lambda t: t.shard)
                    lost_attempts(lost, index, reason)
                    # With several shards in flight the row that did it may be in any of them: all are retried.
                    logger.warning(
                        "worker %d %s holding shard(s) %s; started a replacement%s",
                        index,
                        ("died" if up else "failed to start (a replacement)")
                        if dead
                        else "failed on its device (every later call would fail too)",
                        ", ".join(f"{t.shard} ({attempt(t)})" for t in lost),
                        "; each is retried alone" if len(lost) > 1 else "",
                    )
                    settle(task, fatal=up)
                    continue
                task.last_error = _short(e)
                logger.warning(
                    "shard %d failed on worker %d (%s): %s", task.shard, index, attempt(task), task.last_error
                )
                task.refused = output_refused(e)
                if task.refused and not halted:
                    halted.append(task.last_error)
                    logger.error(
                        "the output location refuses writes (%s): starting no more shards, as each would be "
                        "generated only to fail at its commit; the %d shard(s) in flight finish",
                        task.last_error,
                        sum(len(h) for h in held),
                    )
                settle(task, fatal=False)
                lost_attempts([task], index, "error")
            fresh.discard(index)  # it ran the shard, so its model is loaded
            start_clock(index)
        for index in [i for i in fresh if held[i] and started(i)]:
            # Up now: its shards get run.shard_timeout_s from here, not the start's grace on top (which cost
            # every retry and search probe of a hanging row cluster.worker_start_timeout_s more).
            fresh.discard(index)
            start_clock(index)
        now = time.monotonic()
        for index in range(len(workers)):
            if held[index] and now > deadline[index]:
                head = next(iter(held[index].values()))
                up = started(index)
                error = f"timed out after {shard_timeout_s:g}s (run.shard_timeout_s)"
                if not up:
                    error += f", its worker not started after cluster.worker_start_timeout_s={start_grace_s:g}s more"
                lost = replace(index, error, fatal=up)
                lost_attempts(lost, index, "timeout" if up else "not_started")
                logger.warning(
                    "shard %d on worker %d still running after run.shard_timeout_s=%gs (%s); "
                    "killed the worker and started a replacement%s",
                    head.shard,
                    index,
                    shard_timeout_s,
                    attempt(head),
                    also_held(lost, head),
                )
    if halted:  # what was left fails with the reason; a rerun resumes it once the output can be written
        shards: dict[int, ShardTask] = {}
        for task in queue:
            if task.probe:  # a probe stands for its shard (unless that shard was given up on already)
                if not search.wanted(task):
                    continue
                search.searches[task.shard].over = True
                task = search.searches[task.shard].task
            shards.setdefault(task.shard, task)
        for task in shards.values():
            if task.attempts == 0:
                task.last_error = f"{NOT_STARTED}{halted[0]}"
            failed.append(task)
        failed.sort(key=lambda t: t.shard)
    return failed
