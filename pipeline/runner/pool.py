"""A fixed pool of shard workers: dispatch, bounded retries, worker replacement.

Each worker (Ray actor) holds one shard at a time. A shard whose worker dies (process killed, node lost),
whose processing raises, or which is still running after `shard_timeout_s` (a hung worker: a stuck device,
a deadlock, a storage call that never returns) is queued again, up to `max_attempts` attempts; a dead or
hung worker is killed and replaced by a new one (which loads the model again, so a replacement's first shard
also gets the worker start-up time). Shards that keep failing are returned with their last error; the others
are unaffected.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ShardTask:
    shard: int
    start: int  # first record (row of the record table)
    stop: int
    attempts: int = 0
    last_error: str | None = None


class WorkerStartError(RuntimeError):
    """A worker could not start (e.g. the model failed to load)."""


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else type(error).__name__


def start_workers(
    make_worker: Callable[[int], Any], count: int, timeout_s: float, options: dict[str, Any]
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Starts `count` workers (each loads the model) and waits until all are ready, at most `timeout_s`."""
    import ray
    from ray.exceptions import GetTimeoutError

    workers = [make_worker(i) for i in range(count)]
    refs = [w.ready.remote() for w in workers]
    infos = []
    deadline = time.monotonic() + timeout_s
    for i, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
        except GetTimeoutError:
            for w in workers:
                ray.kill(w)
            free = ray.available_resources()
            raise WorkerStartError(
                f"{count - i} of {count} workers did not start within cluster.worker_start_timeout_s={timeout_s:g}s. "
                f"Each asks for {options.get('num_cpus')} CPU and {options.get('num_gpus')} GPU; the cluster has "
                f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free. Lower cluster.num_workers, or "
                "wait for (or add) nodes."
            ) from None
        except Exception as e:  # noqa: BLE001 - reported with the worker's own message
            for w in workers:
                ray.kill(w)
            raise WorkerStartError(f"worker {i} failed to start: {_short(e)}") from None
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
) -> list[ShardTask]:
    """Runs every task; returns the tasks that failed `max_attempts` times.

    `shard_timeout_s` (None: no limit) bounds one attempt of a shard, counted from its dispatch; a worker
    started as a replacement gets `start_grace_s` more for its first shard, which waits for the model load.
    """
    import ray
    from ray.exceptions import RayActorError

    queue = deque(tasks)
    idle = list(range(len(workers)))[::-1]
    inflight: dict[Any, tuple[ShardTask, int, float]] = {}  # ref -> (task, worker index, deadline)
    fresh: set[int] = set()  # replacement workers that have not finished a shard yet
    failed: list[ShardTask] = []

    def replace(index: int) -> None:
        ray.kill(workers[index])
        workers[index] = make_worker(index)
        fresh.add(index)
        idle.append(index)

    while queue or inflight:
        while idle and queue:
            index = idle.pop()
            task = queue.popleft()
            task.attempts += 1
            chunk = records.slice(task.start, task.stop - task.start)
            deadline = float("inf")
            if shard_timeout_s is not None:
                deadline = time.monotonic() + shard_timeout_s + (start_grace_s if index in fresh else 0.0)
            inflight[workers[index].process.remote(task.shard, chunk, task.attempts)] = (
                task,
                index,
                deadline,
            )
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_s)
        on_tick()
        now = time.monotonic()
        expired = [ref for ref, (_, _, deadline) in inflight.items() if ref not in ready and now > deadline]
        for ref in ready + expired:
            task, index, _ = inflight.pop(ref)
            if ref in expired:
                task.last_error = f"timed out after {shard_timeout_s:g}s (run.shard_timeout_s)"
                logger.warning(
                    "shard %d on worker %d still running after run.shard_timeout_s=%gs (attempt %d/%d); "
                    "killing the worker and starting a replacement",
                    task.shard,
                    index,
                    shard_timeout_s,
                    task.attempts,
                    max_attempts,
                )
                replace(index)
            else:
                try:
                    on_commit(ray.get(ref))
                    fresh.discard(index)
                    idle.append(index)
                    continue
                except RayActorError as e:
                    task.last_error = f"worker died: {_short(e)}"
                    logger.warning(
                        "worker %d died while processing shard %d (attempt %d/%d); starting a replacement",
                        index,
                        task.shard,
                        task.attempts,
                        max_attempts,
                    )
                    replace(index)
                except Exception as e:  # noqa: BLE001 - the shard failed inside the worker
                    task.last_error = _short(e)
                    logger.warning(
                        "shard %d failed on worker %d (attempt %d/%d): %s",
                        task.shard,
                        index,
                        task.attempts,
                        max_attempts,
                        task.last_error,
                    )
                    fresh.discard(index)  # it ran the shard, so its model is loaded
                    idle.append(index)
            if task.attempts < max_attempts:
                time.sleep(min(2.0 ** (task.attempts - 1), 10.0) * 0.1)
                queue.append(task)
            else:
                logger.error(
                    "shard %d failed %d times; giving up on it: %s",
                    task.shard,
                    task.attempts,
                    task.last_error,
                )
                failed.append(task)
    return failed
