"""The pool's scheduling with shards in flight (pipeline/runner/pool.py), on real Ray actors that stand in for
ShardWorker: threaded like it, one shard's work at a time inside like its shared sampler, and recording how
many shards they held while each one ran."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import pyarrow as pa
import pytest

from pipeline.runner.pool import (
    START_REPLACEMENTS,
    ShardTask,
    WorkerNotStarted,
    WorkerStartError,
    device_failed,
    run_pool,
    start_workers,
)

pytestmark = pytest.mark.ray


def cuda_error(what: str, name: str) -> str:
    """A CUDA error's message as torch words it (c10/cuda/CUDAException.cpp), lines of advice after the error."""
    return (
        f"CUDA error: {what}\n"
        f"Search for `{name}' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more "
        "information.\nFor more detailed error information, run with CUDA_LOG_FILE=stderr\n"
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
    )


class HeldRecorder:
    """Processes a shard in `seconds` (one at a time, like one sampler), failing or hanging where told: `fail`
    and `hang` by (shard, attempt); `die` and `hang_rows` by row (the records' `i`), whenever a shard or a probe
    runs that row; `die_together` when it runs all those rows at once; `device_rows` raise a CUDA error, after
    which every call fails; `oom` (by (shard, attempt)) a CUDA out-of-memory error, after which the device works;
    `start_fails` (seconds) makes it fail to start, after that long, `start_hangs` never end its start,
    `start_error` keep that error as ShardWorker keeps the user's (every call raises WorkerNotStarted); shards in
    `unwritable` end by writing their part under `output`, a local store that refuses it."""

    def __init__(
        self,
        seconds: float,
        fail: tuple = (),
        hang: tuple = (),
        die: tuple = (),
        hang_rows: tuple = (),
        die_together: tuple = (),
        raise_rows: tuple = (),
        device_rows: tuple = (),
        oom: tuple = (),
        exits: tuple = (),
        start_fails: float | None = None,
        start_hangs: bool = False,
        start_error: str | None = None,
        unwritable: tuple = (),
        output: str | None = None,
    ) -> None:
        self.start_error = start_error
        if start_fails is not None:  # as a model load on a GPU that is gone for good: it fails, after a while
            time.sleep(start_fails)
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered")
        if start_hangs:  # or never ends
            time.sleep(600)
        self.seconds, self.fail, self.hang, self.die = seconds, set(fail), set(hang), set(die)
        self.hang_rows, self.die_together, self.raise_rows = (
            set(hang_rows),
            set(die_together),
            set(raise_rows),
        )
        self.device_rows, self.device_broken, self.oom = set(device_rows), False, set(oom)
        self.exits = set(exits)
        self.unwritable, self.output = set(unwritable), output
        self.lock, self.work = threading.Lock(), threading.Lock()
        self.active: dict[int, int] = {}  # shard -> most shards held while it ran

    def ready(self) -> bool:
        if self.start_error is not None:
            raise WorkerNotStarted(self.start_error, "Traceback (most recent call last): ...")
        return True

    def process(self, shard: int, records, attempt: int, skip=None, probe=False) -> dict:
        self.ready()
        rows = {v for p, v in enumerate(records.column("i").to_pylist()) if p not in (skip or {})}
        with self.lock:
            self.active[shard] = 0
            for s in self.active:
                self.active[s] = max(self.active[s], len(self.active))
        try:
            with self.work:
                time.sleep(60 if (shard, attempt) in self.hang or rows & self.hang_rows else self.seconds)
            if (shard, attempt) in self.exits:
                os._exit(1)  # as a worker whose node is lost
            if rows & self.die or (self.die_together and self.die_together <= rows):
                os._exit(1)  # the worker process dies, as on a device fault or OOM kill
            if self.device_broken or rows & self.device_rows:  # as a CUDA error: every later call fails too
                import torch

                self.device_broken = True
                raise torch.AcceleratorError(
                    cuda_error("an illegal memory access was encountered", "cudaErrorIllegalAddress")
                )
            if (shard, attempt) in self.oom:  # as torch raises it when a CUDA allocation fails
                import torch

                raise torch.AcceleratorError(cuda_error("out of memory", "cudaErrorMemoryAllocation"))
            if (shard, attempt) in self.fail or rows & self.raise_rows:
                raise RuntimeError(f"shard {shard} failed on purpose")
            if shard in self.unwritable:  # its commit: the output location's own error
                from pipeline.io.store import LocalStore

                LocalStore(self.output).write_bytes(f"data/part-{shard:05d}.parquet", b"")
            if probe:
                return {"shard": shard, "probe": True, "rows": len(rows)}
            return {
                "shard": shard,
                "attempt": attempt,
                "rows": len(rows),
                "skipped": dict(skip or {}),
                "peak": self.active[shard],
            }
        finally:
            with self.lock:
                del self.active[shard]


def _run(
    ray,
    *,
    workers: int,
    shards: int,
    in_flight: int,
    timeout_s=None,
    attempts=3,
    give_up=(),
    size=2,
    grace_s=60.0,
    failed_out=None,
    lost_out=None,
    broken_slots=(),
    broken=None,
    **behaviour,
):
    """`broken_slots`: worker indices whose replacements are made with `broken` (their device is gone);
    `lost_out` gets (shard, worker index, reason) of each attempt that did not commit (run_pool's on_failure)."""
    cls = ray.remote(HeldRecorder).options(num_cpus=0, max_concurrency=in_flight + 1)
    made = []
    lost = [] if lost_out is None else lost_out

    def make_worker(index: int):
        replacement = len(made) >= workers
        made.append(index)
        if replacement and index in broken_slots:
            return cls.remote(**behaviour, **broken)
        return cls.remote(**behaviour)

    records = pa.table({"i": list(range(shards * size)), "id": [f"r{i}" for i in range(shards * size)]})
    tasks = [ShardTask(shard=s, start=size * s, stop=size * s + size) for s in range(shards)]
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
        start_grace_s=grace_s,  # a replacement's first shard waits for its start
        in_flight=in_flight,
        on_failure=lambda task, index, reason: lost.append((task.shard, index, reason)),
    )
    if failed_out is not None:
        failed_out.extend(failed)
    assert sorted(t.shard for t in failed) == sorted(give_up), [(t.shard, t.last_error) for t in failed]
    assert sorted(commits) == sorted(set(range(shards)) - set(give_up))
    assert all(c["rows"] + len(c["skipped"]) == size for c in commits.values())
    return commits, made[workers:]


def test_each_worker_holds_up_to_in_flight_shards(ray_local):
    commits, replaced = _run(ray_local, workers=2, shards=8, in_flight=2, seconds=0.3)
    assert max(c["peak"] for c in commits.values()) == 2 and not replaced
    commits, _ = _run(ray_local, workers=2, shards=4, in_flight=1, seconds=0.1)
    assert {c["peak"] for c in commits.values()} == {1}


def test_every_worker_gets_a_shard_before_any_gets_a_second(ray_local):
    """Two shards, two idle workers that could each hold both: one shard each, not both on one worker while
    the other idles."""
    commits, _ = _run(ray_local, workers=2, shards=2, in_flight=2, seconds=0.5)
    assert {s: c["peak"] for s, c in commits.items()} == {0: 1, 1: 1}, "each shard ran alone on its worker"


def test_a_retried_shard_runs_alone_on_its_worker(ray_local):
    lost = []
    commits, _ = _run(ray_local, workers=1, shards=5, in_flight=2, seconds=0.3, fail=[(1, 1)], lost_out=lost)
    assert commits[1]["attempt"] == 2 and commits[1]["peak"] == 1, commits[1]
    assert lost == [(1, 0, "error")]
    assert all(c["attempt"] == 1 for s, c in commits.items() if s != 1)
    assert max(c["peak"] for c in commits.values()) == 2


def test_the_timeout_bounds_the_time_a_worker_goes_without_finishing_a_shard(ray_local):
    """Three 2-second shards, one at a time inside the worker: the last two finish 4 s after they were
    dispatched, but 2 s after the shard before them, within the 3.5 s limit."""
    commits, replaced = _run(ray_local, workers=1, shards=3, in_flight=2, timeout_s=3.5, seconds=2.0)
    assert not replaced and all(c["attempt"] == 1 for c in commits.values())


def test_a_hung_worker_takes_every_shard_it_held_down_and_they_are_retried_alone(ray_local, caplog):
    lost = []
    commits, replaced = _run(
        ray_local, workers=1, shards=3, in_flight=2, timeout_s=3.0, seconds=0.2, hang=[(0, 1)], lost_out=lost
    )
    assert replaced == [0], "the hung worker was replaced"
    held = re.search(r"\(shard\(s\) (\d+) it also held are retried\)", caplog.text)
    assert held, caplog.text
    assert sorted(lost) == sorted([(0, 0, "timeout"), (int(held[1]), 0, "timeout")])
    for shard in (0, int(held[1])):
        assert commits[shard]["attempt"] == 2 and commits[shard]["peak"] == 1, "retried, alone"


def test_a_shard_that_kills_its_worker_takes_no_healthy_neighbour_with_it(ray_local, caplog):
    """One attempt each (run.max_shard_attempts=1): the shards held beside the killer get an attempt alone;
    the killer, which then kills its worker alone too, has the row that does searched for, and is committed
    without it."""
    lost = []
    commits, replaced = _run(
        ray_local, workers=1, shards=4, in_flight=2, attempts=1, seconds=0.5, die=[3], lost_out=lost
    )
    assert replaced, "the dead worker was replaced"
    # Each death names every shard the worker held (the row that killed it may be in any of them).
    deaths = re.findall(r"worker 0 died holding shard\(s\) ([^;]*); started a replacement", caplog.text)
    assert len(deaths) == 3 and "1 (attempt 1/1)" in deaths[0], caplog.text
    # each a lost attempt of a shard; not the search's probe that the third death took
    shards = sorted(int(s) for s in re.findall(r"(\d+) \(attempt", deaths[0] + deaths[1]))
    assert sorted(lost) == [(s, 0, "worker_died") for s in shards] and 1 in shards
    assert (
        deaths[1]
        == "1 (attempt 2: one beyond run.max_shard_attempts=1, alone, as an earlier one shared its worker)"
    )
    assert deaths[2] == "1 (rows 3-3, attempt 1/1, not committed)", "the probe of row 2 went through"
    retried = [s for s, c in commits.items() if c["attempt"] > 1]
    assert retried and all(commits[s]["peak"] == 1 for s in retried), commits
    assert commits[1]["rows"] == 1 and list(commits[1]["skipped"]) == [1], commits[1]
    assert "killed its worker on its one attempt, alone" in commits[1]["skipped"][1], commits[1]
    assert "row 3 (id 'r3') of shard 1 killed its worker on its one attempt alone" in caplog.text
    assert all(not c["skipped"] for s, c in commits.items() if s != 1)


def test_shards_that_fail_together_each_get_an_attempt_alone(ray_local):
    """A sampler failure fails every shard with rows in it: with one attempt each, neither is given up on
    for the other's row; both run again, alone."""
    commits, _ = _run(
        ray_local, workers=1, shards=2, in_flight=2, attempts=1, seconds=0.3, fail=[(0, 1), (1, 1)]
    )
    assert all(c["attempt"] == 2 and c["peak"] == 1 for c in commits.values()), commits


def test_rows_that_kill_their_worker_are_found_and_their_shard_committed_without_them(ray_local, caplog):
    """Two killing rows in a 16-row shard on three workers: pieces of 5-6 rows, then of 2, then single rows,
    each killing row on its max_shard_attempts attempts alone; the other shards are untouched."""
    commits, replaced = _run(
        ray_local, workers=3, shards=3, size=16, in_flight=2, attempts=2, seconds=0.1, die=[17, 26]
    )
    assert sorted(commits[1]["skipped"]) == [1, 10] and commits[1]["rows"] == 14, commits[1]
    assert commits[1]["peak"] == 1 and commits[1]["attempt"] == 3, "the shard ran again, alone"
    assert not commits[0]["skipped"] and not commits[2]["skipped"]
    # The shard's two attempts, the 5-6-row piece and the 2-row piece holding each row, each row's two attempts.
    assert len(replaced) == 2 + 2 + 2 + 4, replaced
    assert "shard 1 runs again without its 2 failing row(s)" in caplog.text


def test_once_the_output_location_refuses_writes_no_more_shards_start(ray_local, tmp_path, caplog):
    """A full disk, a read-only file system or denied access fails every commit from then on: each shard left was
    generated in full and failed at its commit, on every attempt (a run that filled its disk at 30% went on
    generating the other 70% three times over before it exited 1). The pool now stops starting shards and
    returns them as failed, for a rerun once the location can be written."""
    output = tmp_path / "out"
    output.write_text("a file where the run's folder should be")  # writes under it fail for good (ENOTDIR)
    failed = []
    _run(
        ray_local,
        workers=1,
        shards=6,
        in_flight=1,
        seconds=0.1,
        unwritable=(1, 2, 3, 4, 5),
        output=str(output),
        give_up=[1, 2, 3, 4, 5],
        failed_out=failed,
    )
    assert {t.shard: t.attempts for t in failed} == {1: 1, 2: 0, 3: 0, 4: 0, 5: 0}
    assert "Not a directory" in failed[0].last_error and "not started: " not in failed[0].last_error
    # The job's last line says "rerun once the output location can be written again" from this, also where no
    # shard was left unstarted (the last one, or every one in flight when writes began to fail).
    assert failed[0].refused and not any(t.refused for t in failed[1:])
    assert all(t.last_error == f"not started: {failed[0].last_error}" for t in failed[1:]), failed
    assert "the output location refuses writes (" in caplog.text and "starting no more shards" in caplog.text


# Two shards of four rows on two workers, one attempt each, one shard at a time.
SMALL = {"workers": 2, "shards": 2, "size": 4, "in_flight": 1, "attempts": 1, "seconds": 0.1}


def test_a_row_that_hangs_its_worker_is_found_by_the_shard_timeout(ray_local):
    # A replacement gets 1 s more for its start: a probe it had not started is no row's fault.
    commits, _ = _run(ray_local, **SMALL, timeout_s=2.0, hang_rows=[2], grace_s=1.0)
    assert list(commits[0]["skipped"]) == [2] and commits[0]["rows"] == 3, commits[0]
    assert "timed out after 2s (run.shard_timeout_s)" in commits[0]["skipped"][2]


def test_a_replacements_shards_get_the_shard_timeout_from_its_start_not_the_start_grace_too(ray_local):
    """A replacement's shards had cluster.worker_start_timeout_s on top of run.shard_timeout_s until it
    finished one: a hanging row's retries and search probes, which all run on replacements and never finish,
    each waited both (with the defaults 4,200 s instead of 3,600 s). Here, on one worker with a 30 s grace: the
    shard's second attempt and the search's probes of the row hang on replacements, each for the 2 s timeout
    after its worker's start."""
    began = time.monotonic()
    commits, replaced = _run(
        ray_local,
        workers=1,
        shards=1,
        size=2,
        in_flight=1,
        attempts=2,
        seconds=0.1,
        timeout_s=2.0,
        hang_rows=[1],
        grace_s=30.0,
    )
    assert list(commits[0]["skipped"]) == [1] and len(replaced) >= 3, (commits, replaced)
    assert time.monotonic() - began < 30.0, "a shard on a replacement waited for the start's grace"


def test_rows_that_kill_their_worker_only_together_fail_their_shard_saying_so(ray_local):
    """No single row kills the worker, the shard's rows together do (a batch too big for memory): the search
    finds no failing row and gives the shard up, as it did before the search, naming what to change."""
    failed = []
    commits, _ = _run(ray_local, **SMALL, die_together=[0, 3], give_up=[0], failed_out=failed)
    assert sorted(commits) == [1]
    assert "worker died" in failed[0].last_error
    assert "no row of it kills its worker alone" in failed[0].last_error
    assert "lower sampler.batch_size and rerun the same command" in failed[0].last_error
    # A run's shards are part of its identity: a rerun with another run.shard_size is refused (exit 2).
    assert "run.shard_size" not in failed[0].last_error


@pytest.mark.parametrize(
    ("after_search", "why"),
    [
        (
            {"fail": [(0, 3)]},
            "(attempt 1/2: without its 1 failing row(s)): RuntimeError: shard 0 failed on purpose",
        ),
        (
            {"hang": [(0, 3)], "timeout_s": 2.0, "grace_s": 5.0},
            "still running after run.shard_timeout_s=2s (attempt 1/2: without its 1 failing row(s))",
        ),
    ],
    ids=["raises", "hangs"],
)
def test_a_searched_shard_gets_its_attempts_again(ray_local, caplog, after_search, why):
    """Row 2 kills its worker: shard 0's two attempts die, the search finds the row, and the shard's first
    attempt without it raises (a storage error) or hangs its worker (a worker lost to another cause). It is
    retried as a fresh shard would be, not given up on: a rerun would repeat the whole search."""
    commits, _ = _run(ray_local, **{**SMALL, "shards": 1, "attempts": 2}, die=[2], **after_search)
    assert list(commits[0]["skipped"]) == [2] and commits[0]["rows"] == 3, commits[0]
    assert commits[0]["attempt"] == 4, "two attempts, the search, then two more without row 2"
    assert why in caplog.text, caplog.text
    assert caplog.text.count("looking for the row(s) that do") == 1, "searched once"


def test_a_searched_shard_that_still_kills_its_worker_is_given_up_without_a_second_search(ray_local, caplog):
    """Row 2 kills its worker alone, rows 0 and 3 only together: the search finds row 2 (no piece holds both
    0 and 3), and the shard, without row 2, dies again on both of its attempts. It is given up on saying why,
    and not searched again (it would find no other row, each level costing a worker restart)."""
    failed = []
    _run(
        ray_local,
        **{**SMALL, "shards": 1, "attempts": 2},
        die=[2],
        die_together=[0, 3],
        give_up=[0],
        failed_out=failed,
    )
    deaths = re.findall(r"died holding shard\(s\) 0 \((attempt [^;]*)\); started", caplog.text)
    assert deaths[-2:] == [
        "attempt 1/2: without its 1 failing row(s)",
        "attempt 2/2: without its 1 failing row(s)",
    ], deaths
    assert caplog.text.count("looking for the row(s) that do") == 1, "searched once"
    assert (
        "without the 1 row(s) its search found, it killed its worker again on 2 attempt(s) alone"
        in failed[0].last_error
    )
    assert "not searched again" in failed[0].last_error, failed[0].last_error


def test_a_probe_that_raises_gives_its_shard_up(ray_local):
    """A piece of rows that raises instead of killing its worker holds no failing row: the shard is given up
    on with both errors, as a shard that keeps raising is."""
    failed = []
    _run(
        ray_local,
        **{**SMALL, "workers": 1, "shards": 1},
        die_together=[0, 1, 2, 3],
        raise_rows=[3],
        give_up=[0],
        failed_out=failed,
    )
    assert "worker died" in failed[0].last_error
    assert (
        "rows 2-3 of it then raised on every attempt alone: RuntimeError: shard 0 failed on purpose"
        in failed[0].last_error
    )


def test_a_worker_whose_device_failed_is_replaced_and_the_row_that_did_it_found(ray_local, caplog):
    """A CUDA error (an illegal memory access) on row 3 leaves the worker's device unusable: it is replaced as
    a dead one is, so the shards after it are not failed on it, and the row becomes an error row."""
    commits, replaced = _run(
        ray_local, **{**SMALL, "workers": 1, "shards": 3, "attempts": 2}, device_rows=[3]
    )
    assert sorted(commits) == [0, 1, 2] and list(commits[0]["skipped"]) == [3], commits
    assert (
        "its device failed: torch.AcceleratorError: CUDA error: an illegal memory access"
        in commits[0]["skipped"][3]
    )
    assert "TORCH_USE_CUDA_DSA" not in caplog.text, "the error is named, not torch's advice after it"
    assert not commits[1]["skipped"] and not commits[2]["skipped"]
    assert "worker 0 failed on its device (every later call would fail too) holding shard(s) 0" in caplog.text
    # Shard 0's two attempts, its piece of rows 2-3, row 3's two attempts.
    assert len(replaced) == 5, replaced


def test_a_cuda_out_of_memory_error_is_retried_on_the_same_worker(ray_local, caplog):
    """A CUDA allocation that fails leaves the device usable: the shard is retried as after any error, on the
    worker it ran on, which is not replaced (a restart reloads the model)."""
    commits, replaced = _run(ray_local, **{**SMALL, "workers": 1, "attempts": 2}, oom=[(0, 1)])
    assert not replaced, "an out-of-memory error is no device failure"
    assert commits[0]["attempt"] == 2 and not commits[0]["skipped"], commits[0]
    assert "failed on its device" not in caplog.text
    assert "(attempt 1/2): torch.AcceleratorError: CUDA error: out of memory" in caplog.text, caplog.text


@pytest.mark.parametrize(
    ("message", "failed"),
    [
        (cuda_error("an illegal memory access was encountered", "cudaErrorIllegalAddress"), True),
        (cuda_error("device-side assert triggered", "cudaErrorAssert"), True),
        ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(handle, ...)`", True),
        (cuda_error("out of memory", "cudaErrorMemoryAllocation"), False),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", False),
        ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB", False),
    ],
)
def test_which_cuda_errors_leave_the_device_unusable(message, failed):
    import torch

    assert device_failed(torch.AcceleratorError(message)) is failed
    assert device_failed(RuntimeError(message)) is failed


def test_a_dead_workers_shards_go_to_a_worker_that_is_up_not_to_a_replacement_that_is_not(ray_local, caplog):
    """Worker 1 dies (its node lost) holding shard 1, and its replacement never starts (no node left with room
    for it). The shard was retried on that replacement, while worker 0 sat idle: the run hung at 98.7% until
    run.shard_timeout_s + cluster.worker_start_timeout_s had passed (70 min with the defaults) or the node came
    back. Worker 0 now runs it and the run ends at once."""
    began = time.monotonic()
    commits, replaced = _run(
        ray_local,
        workers=2,
        shards=6,
        in_flight=1,
        seconds=0.3,
        exits=[(1, 1)],
        timeout_s=20.0,
        grace_s=20.0,
        broken_slots=[1],
        broken={"start_hangs": True},
    )
    assert replaced == [1] and commits[1]["attempt"] == 2, (replaced, commits[1])
    assert "worker 1 died holding shard(s) 1 (attempt 1/3)" in caplog.text, caplog.text
    # Without the change the retry waited run.shard_timeout_s + the start grace (40 s) on the replacement.
    assert time.monotonic() - began < 30.0, "a shard waited for a replacement that never started"


@pytest.mark.parametrize(
    ("broken", "timeout_s", "why"),
    [
        (
            {"start_fails": 1.0},
            None,
            "its worker failed to start: RuntimeError: CUDA error: uncorrectable ECC error",
        ),
        ({"start_hangs": True}, 1.0, "its worker not started after cluster.worker_start_timeout_s=1s more"),
        (
            {"start_error": "pipeline.models.loader.ModelError: cannot load the weights"},
            None,
            "its worker failed to start: pipeline.models.loader.ModelError: cannot load the weights",
        ),
    ],
    ids=["start-raises", "start-hangs", "start-error-kept"],
)
def test_a_worker_that_cannot_start_makes_no_row_an_error_row(ray_local, caplog, broken, timeout_s, why):
    """Row 2 kills worker 0, whose device is then gone: its replacements fail to start a second after they are
    made, or never end their start, or keep the error of their start as ShardWorker keeps the user's (a model
    that does not load), which every call raises. A probe given to one says nothing about its rows; none of them
    may become an error row (lost from data/ for good, the run complete): the shard is given up on, to rerun on
    good devices."""
    failed = []
    _run(
        ray_local,
        **{**SMALL, "workers": 1, "shards": 1},
        timeout_s=timeout_s,
        grace_s=1.0,
        die=[2],
        broken_slots=[0],
        broken=broken,
        give_up=[0],
        failed_out=failed,
    )
    assert why in failed[0].last_error, failed[0].last_error
    assert not re.search(r"row [013] \(id '\w+'\) of shard 0 killed its worker", caplog.text), caplog.text


class Idle:
    def ready(self) -> bool:
        return True


def test_workers_that_do_not_fit_are_reported_with_what_the_cluster_has_in_all(ray_local):
    """Three 2-CPU workers on the test's 4-CPU instance: two start and hold every CPU. The error said "the
    cluster has 0 CPU and 0 GPU free", as if other work held the cluster, not what it has against what the
    workers need."""
    cls = ray_local.remote(Idle).options(num_cpus=2)
    with pytest.raises(WorkerStartError) as error:
        start_workers(lambda index: cls.remote(), 3, 3.0, {"num_cpus": 2.0, "num_gpus": 0})
    total = ray_local.cluster_resources()["CPU"]
    # 1 of 3, unless the two that fit were still starting at the deadline (a loaded machine): what this pins is
    # the need against the totals, whichever count and free share the timing gives.
    assert re.match(
        r"[13] of 3 workers did not start within cluster\.worker_start_timeout_s=3s\. Each asks for 2\.0 CPU and "
        rf"0 GPU \(6 CPU and 0 GPU for 3\); the cluster has {total:g} CPU and 0 GPU in all, \d+ CPU and 0 GPU "
        r"free beside the workers that started\.",
        str(error.value),
    ), error.value


class DiesWhileStarting:
    """A worker whose process is killed while it loads the model, the first `deaths` times any is made (counted
    in the file `counter`), or whose load raises (`raises`)."""

    def __init__(self, counter: str, deaths: int, raises: bool = False) -> None:
        if raises:
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered")
        with open(counter, "a+") as f:
            f.seek(0)
            died = len(f.read())
            if died < deaths:
                f.write("x")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    def ready(self) -> dict:
        return {"pid": os.getpid()}


@pytest.mark.parametrize(
    ("deaths", "raises", "made", "error"),
    [
        (1, False, 2, None),
        (2, False, 3, None),
        (3, False, 3, "worker 0 failed to start: The actor never ran"),
        (0, True, 1, "worker 0 failed to start: "),
    ],
    ids=["died-once", "died-twice", "died-every-time", "load-raised"],
)
def test_a_worker_whose_process_died_while_it_started_is_replaced(
    ray_local, tmp_path, caplog, deaths, raises, made, error
):
    """A worker killed while it loaded the model (out of memory, a lost node, a kill) ended the job with exit
    code 2 ('failed to start'), though a rerun went through. A load that raises is not retried: it would fail
    again."""
    cls = ray_local.remote(DiesWhileStarting).options(num_cpus=0)
    calls = []

    def make_worker(index: int):
        calls.append(index)
        return cls.remote(str(tmp_path / "deaths"), deaths, raises)

    with caplog.at_level(logging.WARNING, logger="pipeline.runner.pool"):
        if error is None:
            workers, infos = start_workers(make_worker, 1, 120.0, {"num_cpus": 0, "num_gpus": 0})
            assert len(workers) == 1 and infos[0]["pid"] > 0
        else:
            with pytest.raises(WorkerStartError, match=re.escape(error)):
                start_workers(make_worker, 1, 120.0, {"num_cpus": 0, "num_gpus": 0})
    assert calls == [0] * made
    replaced = [r.getMessage() for r in caplog.records if "died while it started" in r.getMessage()]
    assert len(replaced) == min(deaths, START_REPLACEMENTS)


def test_a_worker_whose_model_does_not_load_fails_its_start_in_one_line(ray_local, caplog):
    """A ShardWorker whose model does not load: its __init__ raised, and Ray printed the actor's ~25-line
    creation traceback on the driver's console before the job's line 'worker 0 failed to start: ...'. The
    actor now starts and keeps the error, which its `ready` raises: no creation failure for Ray to print, the
    same line, not replaced (it would fail again), and the traceback in the driver's log at debug level."""
    from ray.exceptions import RayActorError

    from pipeline.generation import GenerationSpec
    from pipeline.runner.worker import ShardWorker

    cls = ray_local.remote(ShardWorker).options(num_cpus=0)
    spec = GenerationSpec(model_path="/nonexistent/model")
    made = []

    def make_worker(index: int):
        made.append(cls.remote(spec, None, compression="zstd", name=f"w{index}", torch_threads=None))
        return made[-1]

    with (
        caplog.at_level(logging.DEBUG, logger="pipeline.runner.pool"),
        pytest.raises(WorkerStartError) as error,
    ):
        start_workers(make_worker, 1, 120.0, {"num_cpus": 0, "num_gpus": 0})
    assert str(error.value) == (
        "worker 0 failed to start: pipeline.models.loader.ModelError: model.path='/nonexistent/model' is not a "
        "directory; give a Hugging Face model directory or s3:// URI"
    )
    assert len(made) == 1, "a load that raised is not retried"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("Traceback (most recent call last):" in m and "in load_model" in m for m in debug), debug
    # The actor's creation succeeded: a call on a fresh one fails with the kept error, not as a dead actor.
    worker = make_worker(1)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Ray's task error wrapping the worker's
        ray_local.get(worker.ready.remote(), timeout=120)
    assert not isinstance(raised.value, RayActorError), raised.value
    assert isinstance(raised.value.cause, WorkerNotStarted), raised.value
    ray_local.kill(worker)
