"""The search for the rows that kill their worker (pipeline/runner/isolate.py), driven here as the pool drives
it: each probe popped, its attempts counted, then passed or failed as its rows decide. No Ray: the pool's end
of it is tested in tests/runner/test_pool.py."""

from __future__ import annotations

import pyarrow as pa

from pipeline.runner.isolate import RowSearch, split
from pipeline.runner.pool import ShardTask


def _search(rows: int, killers: set[int], *, ways: int = 2, max_attempts: int = 2):
    """(the shard as queued again, the shards given up on, the (start, stop) of every probe run)."""
    queue, given_up, runs = [], [], []
    search = RowSearch(
        ways=ways,
        max_attempts=max_attempts,
        records=pa.table({"id": [f"r{i}" for i in range(rows)]}),
        queue=lambda task: queue.insert(0, task),  # the pool's queue: to the front
        give_up=given_up.append,
    )
    search.start(ShardTask(shard=0, start=0, stop=rows, attempts=max_attempts, last_error="worker died"))
    while queue:
        task = queue.pop(0)
        if not task.probe:
            return task, given_up, runs
        if not search.wanted(task):
            continue
        task.attempts += 1
        runs.append((task.start, task.stop))
        if any(task.start <= k < task.stop for k in killers):
            task.last_error = "worker died"
            search.failed(task, fatal=True)
        else:
            search.passed(task)
    return None, given_up, runs


def test_split_covers_every_row_once():
    assert split(0, 8, 3) == [(0, 2), (2, 5), (5, 8)]
    assert split(4, 6, 8) == [(4, 5), (5, 6)], "no more pieces than rows"


def test_a_killing_row_is_found_after_its_own_attempts_and_its_shard_gets_fresh_attempts():
    """Every row is probed (the last piece too); a single row that kills its worker gets max_attempts
    attempts of its own, from zero, before it is an error row; the shard then runs again with it skipped and
    max_attempts tries of its own."""
    shard, given_up, runs = _search(8, {5})
    assert not given_up and sorted(shard.skip) == [5] and "each of its 2 attempts" in shard.skip[5]
    assert runs.count((5, 6)) == 2 and {(0, 4), (4, 8)} <= set(runs)
    assert shard.searched and shard.tries == 0 and not shard.probe


def test_rows_that_kill_only_together_give_the_shard_up():
    shard, given_up, _ = _search(4, set(), ways=2)
    assert (
        shard is None
        and len(given_up) == 1
        and "no row of it kills its worker alone" in given_up[0].last_error
    )
