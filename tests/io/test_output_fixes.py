"""Output files get the mode a plain open() gives them, write_if_absent lets exactly one writer win, and a worker
whose driver no longer holds the run lock writes nothing."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io.commit import RUN_LOCK, FencedError, RunConflictError, RunStore
from pipeline.io.lease import Lease, Refused, read_holder
from pipeline.io.parts import to_table
from pipeline.io.store import LocalStore, Store, StoreError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    return request.getfixturevalue("s3_bucket").store("base/dir")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_local_objects_get_the_mode_open_would_give_them(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = LocalStore(tmp_path / "root")
        store.write_bytes("data/part-00000.parquet", b"x")
        store.write_text("stats.json", "{}")
        store.write_bytes("stats.json", b"{}\n")  # a rewrite too
        with open(tmp_path / "plain", "wb") as f:
            f.write(b"x")
        expected = (tmp_path / "plain").stat().st_mode & 0o777
        assert expected == 0o666 & ~umask
        for key in ("data/part-00000.parquet", "stats.json"):
            mode = (tmp_path / "root" / key).stat().st_mode & 0o777
            assert mode == expected, f"{key}: mode {mode:o}, open() gives {expected:o}"
        assert store.write_if_absent("_columns/c.json", b"{}")
    finally:
        os.umask(old)
    for key in ("_columns/c.json",):
        mode = (tmp_path / "root" / key).stat().st_mode & 0o777
        assert mode == expected, f"{key}: mode {mode:o}, open() gives {expected:o}"
    assert not [p for p in (tmp_path / "root").rglob(".tmp-*")], "no temporary file is left behind"


def test_write_if_absent_keeps_the_first_object(store):
    assert store.write_if_absent("_columns/a.json", b"first")
    assert not store.write_if_absent("_columns/a.json", b"second")
    assert store.read_bytes("_columns/a.json") == b"first"
    assert store.list("_columns/") == ["_columns/a.json"]


def test_write_if_absent_has_one_winner_among_concurrent_writers(tmp_path):
    store = LocalStore(tmp_path / "root")
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        results[i] = store.write_if_absent("k.json", f"writer {i}".encode())

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, created in results.items() if created]
    assert len(winners) == 1
    assert store.read_text("k.json") == f"writer {winners[0]}"


def test_a_worker_whose_driver_lost_the_run_lock_commits_nothing(store):
    """An actor outliving its killed driver holds the old lock token: once a new driver holds the lock (or
    none does), its commit fails before writing any part or marker; the holder's own workers commit."""
    import pyarrow as pa

    def commit(run_store: RunStore, shard: int):
        table = to_table(
            [{"id": f"r{shard}", "source_index": shard}],
            pa.schema([("id", pa.string()), ("source_index", pa.int64())]),
        )
        return run_store.commit_shard(shard, table, [], compression="zstd", stats={}, worker="w0", attempt=1)

    old = Lease(store, RUN_LOCK, "old-driver", "r", 120.0)
    old.acquire()
    assert commit(RunStore(store, "r", fence="old-driver"), 0).rows == 1
    old.release()
    with pytest.raises(FencedError, match="not committing shard 1: .* no longer held .*now: no lock"):
        commit(RunStore(store, "r", fence="old-driver"), 1)
    new = Lease(store, RUN_LOCK, "new-driver", "r", 120.0)
    new.acquire()
    try:
        with pytest.raises(FencedError, match=r"now: \S+ pid \d+\)"):
            commit(RunStore(store, "r", fence="old-driver"), 1)
        assert sorted(store.list()) == ["_commits/shard-00000.json", RUN_LOCK, "data/part-00000.parquet"]
        assert commit(RunStore(store, "r", fence="new-driver"), 1).rows == 1
        assert commit(RunStore(store, "r"), 2).rows == 1  # no fence: no check (tests, tools)
    finally:
        new.release()


def test_a_lock_that_is_not_a_locks_json_is_replaced_with_a_warning(store, caplog):
    store.write_text(RUN_LOCK, "not json {")
    lease = Lease(store, RUN_LOCK, "mine", "r", 120.0)
    with caplog.at_level(logging.WARNING, logger="canvasflow"):
        lease.acquire()
    try:
        assert "is not a lock this tool wrote" in caplog.text
        assert json.loads(store.read_text(RUN_LOCK))["token"] == "mine"
    finally:
        lease.release()
    assert not store.exists(RUN_LOCK)


@pytest.mark.s3
def test_a_lock_that_cannot_be_read_is_not_taken_over(s3_bucket, s3_fault_proxy):
    """A read failure (after the store's retries) is an error, not a free lock: the live holder keeps it."""
    holder = Lease(s3_bucket.store("run"), RUN_LOCK, "live-holder", "r", 120.0)
    holder.acquire()
    try:
        other = Lease(
            s3_bucket.store("run", endpoint_url=s3_fault_proxy.endpoint), RUN_LOCK, "other", "r", 120.0
        )
        s3_fault_proxy.fail_next(100, 500, "InternalError", method="GET")
        with pytest.raises(StoreError):
            other.acquire()
        assert json.loads(s3_bucket.store("run").read_text(RUN_LOCK))["token"] == "live-holder"
    finally:
        holder.release()


def _commit(run: RunStore, shard: int) -> None:
    rows = to_table(
        [{"id": f"r{shard}", "source_index": shard}],
        pa.schema([("id", pa.string()), ("source_index", pa.int64())]),
    )
    run.commit_shard(shard, rows, [], compression="zstd", stats={}, worker="w0", attempt=1)


def test_an_unreadable_commit_marker_leaves_its_shard_uncommitted(store, caplog):
    """A marker that is not JSON (a hand edit, a copy cut short) made every rerun crash with a JSONDecodeError
    traceback and exit code 1 ("rerun to retry"), which could never succeed; the shard is regenerated instead."""
    run = RunStore(store, "r")
    for shard in (0, 1):
        _commit(run, shard)
    store.write_text("_commits/shard-00001.json", '{"shard": 1, ')
    with caplog.at_level(logging.WARNING):
        committed = run.committed()
    assert list(committed) == [0]
    assert "_commits/shard-00001.json" in caplog.text and "regenerated" in caplog.text
    assert run.clean_uncommitted(committed) == ["data/part-00001.parquet"]
    _commit(run, 1)  # the regenerated shard's marker replaces the unreadable one
    assert sorted(run.committed()) == [0, 1]


@pytest.mark.s3
def test_markers_read_before_are_reused_and_only_new_ones_read(s3_bucket, s3_fault_proxy):
    """A resume read every marker three times (at the start, after the workers, and to finalize): 30,000 GETs,
    83 of 96 s, for 10,000 shards on S3. Markers this driver read are reused while they are listed."""
    run = RunStore(s3_bucket.store("run", endpoint_url=s3_fault_proxy.endpoint), "r")
    for shard in (0, 1, 2):
        _commit(run, shard)
    s3_fault_proxy.reset_counts()
    first = run.committed()
    assert sorted(first) == [0, 1, 2] and s3_fault_proxy.count("GET", "/_commits/") == 3
    _commit(
        run, 3
    )  # a worker of this run commits a shard; another shard is uncommitted (its parts were altered)
    run.uncommit([1])
    s3_fault_proxy.reset_counts()
    again = run.committed(known=first)
    assert sorted(again) == [0, 2, 3] and again[0] is first[0] and again[2] is first[2]
    assert s3_fault_proxy.count("GET", "/_commits/") == 1, "only the new marker"
    assert again[3].data_key == "data/part-00003.parquet"


def test_an_unreadable_run_file_is_a_conflict_naming_it(store):
    run = RunStore(store, "r")
    store.write_text("_run.json", '{"run_id": ')
    with pytest.raises(RunConflictError, match=r"_run.json is not readable .*run.overwrite=true"):
        run.identity_status({"run_id": "r"}, overwrite=False)
    assert run.identity_status({"run_id": "r"}, overwrite=True) == "replace"


def test_run_overwrite_leaves_no_empty_folder_of_the_old_run_on_local_disk(tmp_path):
    """The old run's objects went, its folders stayed: an empty errors/ (a run without errors has none)."""
    store = LocalStore(tmp_path / "root")
    run = RunStore(store, "r")
    assert run.check_identity({"run_id": "r", "config_fingerprint": "a"}, overwrite=False) == "new"
    store.write_text("_run.json", json.dumps({"run_id": "r", "config_fingerprint": "a"}))
    _commit(run, 0)
    store.write_text("errors/part-00000.parquet", "x")
    store.write_text(RUN_LOCK, "{}")  # the replacing process's own lock stays
    assert run.check_identity({"run_id": "r", "config_fingerprint": "b"}, overwrite=True) == "new"  # replaced
    assert sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")) == [RUN_LOCK]


def _commit_with_errors(run: RunStore, shard: int, rows: int, errors: int) -> None:
    table = to_table(
        [{"id": f"r{shard}-{i}", "source_index": shard * 10 + i} for i in range(rows)],
        pa.schema([("id", pa.string()), ("source_index", pa.int64())]),
    )
    error_rows = [
        {"id": f"e{shard}-{i}", "source_index": shard * 10 + rows + i, "stage": "read", "reason": "bad"}
        for i in range(errors)
    ]
    run.commit_shard(shard, table, error_rows, compression="zstd", stats={}, worker="w0", attempt=1)


def test_cleaning_uncommitted_objects_keeps_every_committed_part_and_deletes_every_other_one(store):
    """On a resume, committed error parts stay (deleting them loses rejected rows: the shard then fails its
    post-run check) and every uncommitted part goes, in errors/ too (kept, its rows would be there twice)."""
    run = RunStore(store, "r")
    _commit_with_errors(run, 0, rows=2, errors=1)
    _commit_with_errors(run, 1, rows=0, errors=2)  # every row rejected: an errors part only
    store.write_bytes("data/part-00002.parquet", b"a killed attempt's part")
    store.write_bytes("errors/part-00002.parquet", b"a killed attempt's part")
    committed = run.committed()
    assert run.clean_uncommitted(committed) == ["data/part-00002.parquet", "errors/part-00002.parquet"]
    assert sorted(store.list("data/") + store.list("errors/")) == [
        "data/part-00000.parquet",
        "errors/part-00000.parquet",
        "errors/part-00001.parquet",
    ], "only the committed parts are left"
    assert run.verify(committed) == [], "every committed part is still whole"


@pytest.mark.parametrize("part", ["data/part-00000.parquet", "errors/part-00000.parquet"])
def test_a_committed_part_that_is_missing_or_altered_fails_verification(store, part):
    """An errors part removed or changed by hand counts as a broken shard as a data part does: the run cannot
    be complete without the rejected rows that part held."""
    run = RunStore(store, "r")
    _commit_with_errors(run, 0, rows=2, errors=1)
    _commit_with_errors(run, 1, rows=2, errors=1)
    committed = run.committed()
    assert run.verify(committed) == []
    store.write_bytes(part, store.read_bytes(part) + b"x")
    assert run.verify(committed) == [0], f"{part} has another size than its marker records"
    store.delete([part])
    assert run.verify(committed) == [0], f"{part} is missing"


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("input_fingerprint", "the input's content"),
        ("config_fingerprint", "config_fingerprint c -> other"),  # a run that records no settings
        ("shard_size", "run.shard_size 6 -> other"),
        ("num_rows", "input rows 18 -> other"),
    ],
)
def test_a_run_id_holding_a_run_of_another_shard_plan_or_input_is_a_conflict(store, key, said):
    """run.shard_size is not in the config fingerprint: a resume with another one, had it been let through,
    would cut the remaining shards at other rows than the committed ones, so rows would be lost or doubled."""
    run = RunStore(store, "r")
    identity = {"input_fingerprint": "i", "config_fingerprint": "c", "shard_size": 6, "num_rows": 18}
    run.write_run_file(identity)
    assert run.identity_status(dict(identity), overwrite=False) == "resume"
    changed = {**identity, key: "other"}
    with pytest.raises(RunConflictError, match=rf"started with a different input or config \({said}\)"):
        run.identity_status(changed, overwrite=False)
    assert run.identity_status(changed, overwrite=True) == "replace"


def test_a_refused_rerun_of_a_mask_run_names_the_sampler_mask_keys_that_changed(store):
    """A LLaDA / Dream run records its resolved sampler settings flat: a rerun with sampler.mask.cache=dual was
    refused naming `sampler.cache none -> dual`, a key the config does not have."""
    run = RunStore(store, "r")
    sampler = {"mask_token_id": 2, "max_new_tokens": 16, "seed": 0, "cache": "none", "steps": 16}
    config = {"sampler": sampler, "data": {"prompt_column": "prompt"}}
    identity = {"input_fingerprint": "i", "config_fingerprint": "c", "shard_size": 6, "num_rows": 18}
    run.write_run_file({**identity, "config": config})
    changed = {"mask_token_id": 2, "max_new_tokens": 32, "seed": 0, "cache": "dual", "steps": 32}
    rerun = {**identity, "config_fingerprint": "c2", "config": {**config, "sampler": changed}}
    with pytest.raises(RunConflictError) as err:
        run.identity_status(rerun, overwrite=False)
    assert (
        "(sampler.mask.cache none -> dual, sampler.max_new_tokens 16 -> 32, sampler.mask.steps 16 -> 32)"
        in str(err.value)
    )


class _MarkerVanishes(LocalStore):
    """A local store on which one commit marker is deleted right after the markers are listed, as a run being
    replaced by another process does between a resume's listing and its reads."""

    def __init__(self, root: Path, vanishing: str) -> None:
        super().__init__(root)
        self.vanishing = vanishing

    def list(self, prefix: str = "") -> list[str]:
        keys = super().list(prefix)
        if prefix == "_commits/" and self.vanishing in keys:
            self.delete([self.vanishing])
        return keys


def test_a_marker_deleted_between_the_listing_and_its_read_is_skipped(tmp_path):
    run = RunStore(LocalStore(tmp_path / "root"), "r")
    for shard in (0, 1, 2):
        _commit(run, shard)
    racing = RunStore(_MarkerVanishes(tmp_path / "root", "_commits/shard-00001.json"), "r")
    assert sorted(racing.committed()) == [0, 2], "the vanished marker's shard is uncommitted, not an error"


class _TakenOverWhileWriting(LocalStore):
    """A local store on which another driver takes the run lock over while a part is being written (the old
    lock's holder gone silent, the new one acquiring it), between a worker's first fence check and its marker."""

    def write_bytes(self, key: str, data: bytes) -> None:
        super().write_bytes(key, data)
        if key.startswith("data/"):
            super().write_text(RUN_LOCK, "{}")  # not a lock this tool wrote: the next acquire replaces it
            Lease(LocalStore(self.root), RUN_LOCK, "new-driver", "r", 120.0).acquire()


def test_a_lock_taken_over_while_the_parts_were_written_leaves_the_shard_uncommitted(tmp_path):
    """The marker is the commit point: the fence is checked again right before it, so a worker whose driver lost
    the lock while its parts were being written commits nothing (the new holder regenerates the shard)."""
    store = _TakenOverWhileWriting(tmp_path / "root")
    Lease(LocalStore(store.root), RUN_LOCK, "old-driver", "r", 120.0).acquire()
    with pytest.raises(FencedError, match="not committing shard 0"):
        _commit(RunStore(store, "r", fence="old-driver"), 0)
    assert store.list("_commits/") == [], "no marker is written once the lock is another's"
    assert json.loads(store.read_text(RUN_LOCK))["token"] == "new-driver"


def test_a_part_given_the_runs_column_schema_gets_a_marker_that_describes_it(store):
    """finalize rewrites the parts written before a postprocess column was fixed; each rewritten part's marker
    is rewritten too, else the next start finds the part's size unlike its marker's and regenerates the shard."""
    from pipeline.io.columns import RunColumn, fix_columns

    run = RunStore(store, "r")
    _commit(run, 0)
    fix_columns(store, [RunColumn("score", pa.float64(), "declared by test", 0)])
    commits = run.committed()
    assert run.conform_parts(commits) == [0]
    on_store = RunStore(store, "r").committed()[0]
    assert on_store.data_bytes == len(store.read_bytes("data/part-00000.parquet"))
    assert on_store.columns == commits[0].columns and ["score", "double"] in on_store.columns
    assert run.verify(run.committed()) == [], "the rewritten part matches its marker"
    assert run.conform_parts(run.committed()) == [], "a part with the run's schema is left as it is"


def test_a_release_after_an_unnoticed_takeover_leaves_the_new_holders_lock(store):
    """The heartbeat notices a takeover only at its next beat: a holder releasing before then deletes the lock
    only if it still holds its own token, never the process's that took it over."""
    old = Lease(store, RUN_LOCK, "old-driver", "r", 120.0)
    old.acquire()
    taken = {"token": "new-driver", "run_id": "r", "host": "elsewhere", "pid": 1, "heartbeat_at": 0}
    store.write_text(RUN_LOCK, json.dumps(taken))
    old.release()
    assert json.loads(store.read_text(RUN_LOCK))["token"] == "new-driver", "the new holder keeps its lock"


def test_of_concurrent_takers_of_a_stale_lock_exactly_one_goes_on(tmp_path):
    """Each taker writes its token over the stale lock, then reads it back after a moment: the one whose write
    landed last holds it, every other one is refused ("lost the race") instead of going on as a second holder."""
    store = LocalStore(tmp_path / "root")
    dead = {"token": "dead", "run_id": "r", "host": "elsewhere", "pid": 1, "heartbeat_at": 0}
    store.write_text(RUN_LOCK, json.dumps(dead))
    os.utime(store.root / RUN_LOCK, (0, 0))  # silent for decades: stale
    barrier = threading.Barrier(4)
    outcome: dict[int, str] = {}
    leases = [Lease(store, RUN_LOCK, f"taker-{i}", "r", 120.0) for i in range(4)]

    def take(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            outcome[i] = "held"
        except Refused as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, result in outcome.items() if result == "held"]
    try:
        assert len(winners) == 1, outcome
        assert json.loads(store.read_text(RUN_LOCK))["token"] == f"taker-{winners[0]}"
    finally:
        for i in winners:
            leases[i].release()


class _ReleasedWhileRead(LocalStore):
    """A local store on which the lock is released between read_holder's existence check and its read."""

    def read_bytes(self, key: str) -> bytes:
        if key == RUN_LOCK:
            self.delete([key])
        return super().read_bytes(key)


def test_a_lock_released_between_its_check_and_its_read_is_free(tmp_path):
    store = _ReleasedWhileRead(tmp_path / "root")
    store.write_text(RUN_LOCK, json.dumps({"token": "leaving", "run_id": "r", "host": "h", "pid": 1}))
    assert read_holder(store, RUN_LOCK) is None, "no lock, not a StoreError"


def test_a_live_holders_lock_never_looks_stale_between_its_heartbeats(tmp_path):
    """The heartbeat rewrites the lock several times per stale_s (every second here): sampled over more than
    stale_s, a live holder's lock is never old enough for another process to take it over, nor near it."""
    from pipeline.io.lease import holder_is_stale

    store = LocalStore(tmp_path / "root")
    live = Lease(store, RUN_LOCK, "live", "r", 4.0)
    live.acquire()
    try:
        ages = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            holder = read_holder(store, RUN_LOCK)
            ages.append(store.age_s(RUN_LOCK))
            assert not holder_is_stale(store, RUN_LOCK, holder, 4.0), f"stale at age {ages[-1]:.2f}s"
            time.sleep(0.05)
        assert max(ages) < 2.5, f"a heartbeat every second, the oldest lock seen {max(ages):.2f}s old"
    finally:
        live.release()


def test_a_location_holding_objects_but_no_run_is_replaced_only_with_overwrite(store):
    run = RunStore(store, "r")
    store.write_text("notes.txt", "someone else's file")
    store.write_text(RUN_LOCK, "{}")  # the lock of the process asking
    with pytest.raises(
        RunConflictError, match=r"is not empty but holds no canvasflow run \(1 objects, e.g. 'notes.txt'\)"
    ):
        run.check_identity({"run_id": "r"}, overwrite=False)
    assert store.exists("notes.txt")
    assert run.check_identity({"run_id": "r"}, overwrite=True) == "new"
    assert store.list() == [RUN_LOCK], "the objects went, the asking process's lock stayed"


def test_a_lock_that_could_not_be_released_says_when_the_next_run_takes_it_over(tmp_path, caplog):
    """A lock whose delete failed said "the next run takes it over after 120s", but a next run on the same host
    took it over at once (its holder's process gone): the message names both cases, as holder_is_stale judges
    them."""
    import socket
    import subprocess
    import sys

    from pipeline.io.lease import holder_is_stale

    class FailingDelete(LocalStore):
        def delete(self, keys):
            raise StoreError(f"cannot delete {keys}: Input/output error")

    store = FailingDelete(tmp_path / "root")
    lease = Lease(store, RUN_LOCK, "mine", "r", 120.0)
    lease.acquire()
    with caplog.at_level(logging.WARNING, logger="canvasflow"):
        lease.release()
    assert (
        f"could not release {store.describe(RUN_LOCK)} (cannot delete ['_lock']: Input/output error); a next run on "
        "this host takes it over as soon as this process has exited, one on another host (or in another "
        "container) once its last heartbeat is 120s old"
    ) in caplog.text
    lock = json.loads(store.read_text(RUN_LOCK))
    assert lock["host"] == socket.gethostname()
    assert not holder_is_stale(store, RUN_LOCK, lock, 120.0), "not while this process lives"
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = {**lock, "pid": int(exited.stdout), "process_start": None}
    assert holder_is_stale(store, RUN_LOCK, gone, 120.0), "on this host: at once once it has exited"
    assert not holder_is_stale(store, RUN_LOCK, {**gone, "host": "another-host"}, 120.0), "elsewhere: 120s"
