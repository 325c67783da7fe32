"""The pool's scheduling with shards in flight (pipeline/runner/pool.py), on real Ray actors that stand in for
ShardWorker: threaded like it, one shard's work at a time inside like its shared sampler, and recording how
many shards they held while each one ran."""

from __future__ import annotations

import os
import re
import threading
import time

import pyarrow as pa
import pytest

from pipeline.runner.pool import ShardTask, run_pool

pytestmark = pytest.mark.ray


class HeldRecorder:
    """Processes a shard in `seconds` (one at a time, like one sampler), failing or hanging where told."""

    def __init__(self, seconds: float, fail: tuple = (), hang: tuple = (), die: tuple = ()) -> None:
        self.seconds, self.fail, self.hang, self.die = seconds, set(fail), set(hang), set(die)
        self.lock, self.work = threading.Lock(), threading.Lock()
        self.active: dict[int, int] = {}  # shard -> most shards held while it ran

    def ready(self) -> bool:
        return True

    def process(self, shard: int, records, attempt: int) -> dict:
        with self.lock:
            self.active[shard] = 0
            for s in self.active:
                self.active[s] = max(self.active[s], len(self.active))
        try:
            with self.work:
                time.sleep(60 if (shard, attempt) in self.hang else self.seconds)
            if (shard, attempt) in self.fail:
                raise RuntimeError(f"shard {shard} failed on purpose")
            if shard in self.die:
                os._exit(1)  # the worker process dies, as on a device fault or OOM kill
            return {"shard": shard, "attempt": attempt, "rows": records.num_rows, "peak": self.active[shard]}
        finally:
            with self.lock:
                del self.active[shard]


def _run(
    ray, *, workers: int, shards: int, in_flight: int, timeout_s=None, attempts=3, give_up=(), **behaviour
):
    cls = ray.remote(HeldRecorder).options(num_cpus=0, max_concurrency=in_flight + 1)
    made = []

    def make_worker(index: int):
        made.append(index)
        return cls.remote(**behaviour)

    records = pa.table({"i": list(range(shards * 2))})
    tasks = [ShardTask(shard=s, start=2 * s, stop=2 * s + 2) for s in range(shards)]
    commits: dict[int, dict] = {}
    pool = [make_worker(i) for i in range(workers)]
    ray.get([w.ready.remote() for w in pool])  # as start_workers does: shards go to workers that are up
    failed = run_pool(
        pool,
        make_worker,
        tasks,
        records,
        max_attempts=attempts,
        on_commit=lambda c: commits.__setitem__(c["shard"], c),
        on_tick=lambda: None,
        tick_s=0.1,
        shard_timeout_s=timeout_s,
        start_grace_s=60.0,  # a replacement's first shard waits for its start
        in_flight=in_flight,
    )
    assert sorted(t.shard for t in failed) == sorted(give_up), [(t.shard, t.last_error) for t in failed]
    assert sorted(commits) == sorted(set(range(shards)) - set(give_up))
    assert all(c["rows"] == 2 for c in commits.values())
    return commits, made[workers:]


def test_each_worker_holds_up_to_in_flight_shards(ray_local):
    commits, replaced = _run(ray_local, workers=2, shards=8, in_flight=2, seconds=0.3)
    assert max(c["peak"] for c in commits.values()) == 2 and not replaced
    commits, _ = _run(ray_local, workers=2, shards=4, in_flight=1, seconds=0.1)
    assert {c["peak"] for c in commits.values()} == {1}


def test_a_retried_shard_runs_alone_on_its_worker(ray_local):
    commits, _ = _run(ray_local, workers=1, shards=5, in_flight=2, seconds=0.3, fail=[(1, 1)])
    assert commits[1]["attempt"] == 2 and commits[1]["peak"] == 1, commits[1]
    assert all(c["attempt"] == 1 for s, c in commits.items() if s != 1)
    assert max(c["peak"] for c in commits.values()) == 2


def test_the_timeout_bounds_the_time_a_worker_goes_without_finishing_a_shard(ray_local):
    """Three 2-second shards, one at a time inside the worker: the last two finish 4 s after they were
    dispatched, but 2 s after the shard before them, within the 3.5 s limit."""
    commits, replaced = _run(ray_local, workers=1, shards=3, in_flight=2, timeout_s=3.5, seconds=2.0)
    assert not replaced and all(c["attempt"] == 1 for c in commits.values())


def test_a_hung_worker_takes_every_shard_it_held_down_and_they_are_retried_alone(ray_local, caplog):
    commits, replaced = _run(
        ray_local, workers=1, shards=3, in_flight=2, timeout_s=3.0, seconds=0.2, hang=[(0, 1)]
    )
    assert replaced == [0], "the hung worker was replaced"
    held = re.search(r"\(shard\(s\) (\d+) it also held are retried\)", caplog.text)
    assert held, caplog.text
    for shard in (0, int(held[1])):
        assert commits[shard]["attempt"] == 2 and commits[shard]["peak"] == 1, "retried, alone"


def test_a_shard_that_kills_its_worker_takes_no_healthy_neighbour_with_it(ray_local, caplog):
    """One attempt each (run.max_shard_attempts=1): the shards held beside the killer get an attempt alone,
    the killer, which then kills its worker alone too, is given up on."""
    commits, replaced = _run(
        ray_local, workers=1, shards=4, in_flight=2, attempts=1, give_up=[1], seconds=0.5, die=[1]
    )
    assert replaced, "the dead worker was replaced"
    # Each death names every shard the worker held (the row that killed it may be in any of them).
    deaths = re.findall(r"worker 0 died holding shard\(s\) ([^;]*); started a replacement", caplog.text)
    assert len(deaths) == 2 and "1 (attempt 1/1)" in deaths[0], caplog.text
    assert (
        deaths[1]
        == "1 (attempt 2: one beyond run.max_shard_attempts=1, alone, as an earlier one shared its worker)"
    )
    retried = [s for s, c in commits.items() if c["attempt"] > 1]
    assert retried and all(commits[s]["peak"] == 1 for s in retried), commits


def test_shards_that_fail_together_each_get_an_attempt_alone(ray_local):
    """A sampler failure fails every shard with rows in it: with one attempt each, neither is given up on
    for the other's row; both run again, alone."""
    commits, _ = _run(
        ray_local, workers=1, shards=2, in_flight=2, attempts=1, seconds=0.3, fail=[(0, 1), (1, 1)]
    )
    assert all(c["attempt"] == 2 and c["peak"] == 1 for c in commits.values()), commits
