"""Finding the rows that kill their worker, so that such a row costs its own row and not its shard.

A shard whose worker died (or hung past run.shard_timeout_s) on every attempt, the last one alone on its
worker, cannot be committed; given up on, it would fail every rerun the same way and its run would never
complete. So its rows are run again in pieces, "probes": generated as usual but never committed, each alone on
a worker. A piece that kills its worker is split again, down to single rows, and a row that kills its worker on
run.max_shard_attempts attempts of its own is a failing row. The shard then runs again with its failing rows
written to errors/ (stage "worker", the reason naming the failure) instead of generated; its other rows come
out as they would have (a row's output does not depend on the rows beside it). It gets run.max_shard_attempts
attempts again, as a fresh shard does, so a failure of another cause (a storage error, a worker lost with its
node) does not give it up and make the rerun search again; if it still kills its worker alone, the rows left
fail only together and it is given up on, saying so, not searched a second time (the pool decides that).
When no row kills its worker alone (the rows fail only together, say a batch that runs out of host memory) or
a probe raises instead of dying, the shard is given up on as before, saying so.

A piece is split in as many parts as there are workers (at least two), so that each level of the search runs
in parallel: one failing row in a 1,024-row shard on 8 workers is found in four levels, each costing one dead
worker's restart; its own attempts then cost run.max_shard_attempts - 1 more.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def _attempts(count: int) -> str:
    return "its one attempt" if count == 1 else f"each of its {count} attempts"


def split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) in `parts` contiguous ranges of nearly equal size (fewer when there are fewer rows)."""
    count = max(1, min(parts, stop - start))
    bounds = [start + (stop - start) * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class Search:
    task: Any  # the shard's ShardTask, run again once its failing rows are known
    pending: int = 0  # probes queued or running
    failing: dict[int, str] = field(default_factory=dict)  # record index -> why it is an error row
    over: bool = False  # found, or given up on: results of probes still out are ignored


class RowSearch:
    """The searches under way, one per shard. `queue` takes tasks to run next (probes, then the shard again);
    `give_up` takes a shard that cannot be committed, its last_error saying why."""

    def __init__(
        self,
        *,
        ways: int,
        max_attempts: int,
        records: Any,
        queue: Callable[[Any], None],
        give_up: Callable[[Any], None],
    ) -> None:
        self.ways = max(2, ways)
        self.max_attempts = max_attempts
        self.records = records
        self.queue = queue
        self.give_up = give_up
        self.searches: dict[int, Search] = {}

    def start(self, task: Any) -> None:
        """Begins the search in `task`, a shard whose last attempt, alone, killed its worker."""
        search = self.searches[task.shard] = Search(task)
        if task.stop - task.start == 1:  # its one row has had its attempts alone already
            self._found(search, task.start, task.attempts, task.last_error)
            self._settle(search)
            return
        pieces = self._probe(search, task.start, task.stop)
        logger.warning(
            "shard %d killed its worker on %s (%s); looking for the row(s) that do: its %d rows run again "
            "in %d pieces, each alone and not committed",
            task.shard,
            _attempts(task.attempts),
            task.last_error,
            task.stop - task.start,
            pieces,
        )

    def wanted(self, probe: Any) -> bool:
        """Whether `probe` still needs to run (not when its shard was given up on while it waited)."""
        return not self.searches[probe.shard].over

    def passed(self, probe: Any) -> None:
        search = self.searches[probe.shard]
        search.pending -= 1
        self._settle(search)

    def failed(self, probe: Any, *, fatal: bool) -> None:
        """`probe` raised (fatal=False) or killed its worker, dead or hung (fatal=True)."""
        search = self.searches[probe.shard]
        if search.over:
            return
        if probe.attempts < self.max_attempts and (not fatal or probe.stop - probe.start == 1):
            self._again(probe)
            return
        search.pending -= 1
        if not fatal:
            search.over = True
            search.task.last_error = (
                f"{search.task.last_error}; rows {probe.start}-{probe.stop - 1} of it then raised on every "
                f"attempt alone: {probe.last_error}"
            )
            self.give_up(search.task)
        elif probe.stop - probe.start == 1:
            self._found(search, probe.start, probe.attempts, probe.last_error)
            self._settle(search)
        else:
            pieces = self._probe(search, probe.start, probe.stop)
            logger.warning(
                "rows %d-%d of shard %d killed their worker (%s); splitting them in %d pieces",
                probe.start,
                probe.stop - 1,
                probe.shard,
                probe.last_error,
                pieces,
            )

    def _again(self, probe: Any) -> None:
        probe.alone, probe.shared = True, False
        self.queue(probe)

    def _probe(self, search: Search, start: int, stop: int) -> int:
        ranges = split(start, stop, self.ways)
        for a, b in reversed(ranges):  # each goes to the front of the queue: the first piece runs first
            piece = dataclasses.replace(
                search.task, start=a, stop=b, attempts=0, probe=True, alone=True, shared=False, skip={}
            )
            search.pending += 1
            self.queue(piece)
        return len(ranges)

    def _found(self, search: Search, index: int, attempts: int, error: str | None) -> None:
        search.failing[index] = (
            f"generating this row killed its worker on {_attempts(attempts)}, alone on the worker (last: "
            f"{error}); not generated"
        )
        logger.warning(
            "row %d (id %r) of shard %d killed its worker on %s alone (%s); it becomes an error row (stage "
            "worker)",
            index,
            self.records.column("id")[index].as_py(),
            search.task.shard,
            _attempts(attempts),
            error,
        )

    def _settle(self, search: Search) -> None:
        if search.pending or search.over:
            return
        search.over = True
        task = search.task
        if not search.failing:
            task.last_error = (
                f"{task.last_error}; no row of it kills its worker alone (they fail only together, e.g. a batch "
                "that runs out of memory: lower sampler.batch_size and rerun the same command)"
            )
            self.give_up(task)
            return
        task.skip, task.searched, task.alone, task.shared = dict(search.failing), True, True, False
        task.searched_at = task.attempts  # it gets run.max_shard_attempts attempts again, as a fresh shard
        logger.warning(
            "shard %d runs again without its %d failing row(s) (in errors/, stage worker)",
            task.shard,
            len(search.failing),
        )
        self.queue(task)
