"""pipeline.io.store: LocalStore and S3Store (on a real SeaweedFS) behave the same; S3 calls survive
throttling, 5xx answers, dropped and refused connections (counted through a fault proxy); permanent failures
are quick and name the location without leaking credentials; local writes are atomic."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pipeline.io.store as store_module
from pipeline.io.s3 import S3Store
from pipeline.io.store import LocalStore, S3Options, Store, StoreError
from tests.support.seaweed import SeaweedError, free_ports, inet_sockets, start_seaweedfs

ROOT = Path(__file__).resolve().parents[2]

KEYS = {
    "b.txt": b"bee",
    "a/2.txt": b"two",
    "a/1.txt": b"one",
    "a/sub/x.bin": bytes(range(256)) * 3,
    "ab.txt": b"",
    "dir with space/\u00e9+&=.txt": "\u00e9t\u00e9".encode(),
}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same tests on both backends; the S3 store is rooted below the bucket to exercise key prefixes."""
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    return request.getfixturevalue("s3_bucket").store("base/dir")


def fill(store: Store) -> None:
    for key, data in KEYS.items():
        store.write_bytes(key, data)


# -- both backends -------------------------------------------------------------------------------------------


def test_write_read_exists_overwrite(store: Store) -> None:
    assert not store.exists("a/1.txt")
    store.write_bytes("a/1.txt", b"first")
    store.write_text("notes.md", "d\u00e9j\u00e0 vu\n")
    assert store.exists("a/1.txt") and store.exists("notes.md")
    assert not store.exists("a") and not store.exists("a/1")  # folders and key prefixes are not objects
    assert store.read_bytes("a/1.txt") == b"first"
    assert store.read_text("notes.md") == "d\u00e9j\u00e0 vu\n"
    store.write_bytes("a/1.txt", b"second")
    assert store.read_bytes("a/1.txt") == b"second"


def test_read_missing_key_names_it(store: Store) -> None:
    with pytest.raises(StoreError, match="missing/key.json"):
        store.read_bytes("missing/key.json")


def test_list_is_recursive_sorted_relative_and_filters_by_string_prefix(store: Store) -> None:
    assert store.list() == []
    fill(store)
    assert store.list() == sorted(KEYS)
    assert store.list("a/") == ["a/1.txt", "a/2.txt", "a/sub/x.bin"]
    assert store.list("a") == ["a/1.txt", "a/2.txt", "a/sub/x.bin", "ab.txt"]  # a string prefix, as in S3
    assert store.list("a/sub/x") == ["a/sub/x.bin"]
    assert store.list("a/1.txt") == ["a/1.txt"]
    assert store.list("dir with space/") == ["dir with space/\u00e9+&=.txt"]
    assert store.list("nothing/") == [] and store.list("zzz") == []
    assert store.list_sizes("a/") == {"a/1.txt": 3, "a/2.txt": 3, "a/sub/x.bin": 768}
    assert all(store.read_bytes(key) == data for key, data in KEYS.items())


def test_delete_and_delete_prefix(store: Store) -> None:
    fill(store)
    store.delete(["b.txt", "never/written.txt"])  # missing keys are fine
    assert "b.txt" not in store.list()
    assert store.delete_prefix("a/") == 3
    assert store.list() == ["ab.txt", "dir with space/\u00e9+&=.txt"]
    assert store.delete_prefix("") == 2
    assert store.list() == []
    store.delete([])


def test_child_is_rooted_below_its_parent(store: Store) -> None:
    child = store.child("runs/r1")
    child.write_text("data/part-0.parquet", "x")
    assert store.list() == ["runs/r1/data/part-0.parquet"]
    assert child.list() == ["data/part-0.parquet"]
    assert child.read_text("data/part-0.parquet") == "x"
    assert child.describe("data/part-0.parquet") == store.describe("runs/r1/data/part-0.parquet")
    assert child.delete_prefix("") == 1 and store.list() == []


def test_download_file_copies_to_a_local_path(store: Store, tmp_path: Path) -> None:
    fill(store)
    dest = tmp_path / "copy.bin"
    assert store.download_file("a/sub/x.bin", dest) == 768
    assert dest.read_bytes() == KEYS["a/sub/x.bin"]
    with pytest.raises(StoreError, match="nope.bin"):
        store.download_file("nope.bin", tmp_path / "nope.bin")


def test_age_is_measured_by_the_store_clock(store: Store) -> None:
    """What lock staleness is judged by: the object's age on the store (S3: Date minus Last-Modified)."""
    assert store.age_s("missing") is None
    store.write_text("_lock", "{}")
    fresh = store.age_s("_lock")
    assert fresh is not None and 0 <= fresh < 3
    time.sleep(2.2)
    aged = store.age_s("_lock")
    assert aged is not None and aged >= 1 and aged > fresh
    store.write_text("_lock", "{}")  # a heartbeat
    assert store.age_s("_lock") < aged


def test_a_fresh_lock_with_a_lagging_clock_is_not_stale(store: Store) -> None:
    from pipeline.io.lease import Lease, Refused

    behind = {"token": "t", "run_id": "r", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 600}
    store.write_text("_lock", json.dumps(behind))
    with pytest.raises(Refused, match="another run holds"):
        Lease(store, "_lock", "me", "r2", 120.0).acquire()


def test_check_writable_leaves_nothing_behind(store: Store) -> None:
    store.check_writable()
    assert store.list() == []


def test_store_pickles_for_workers(store: Store) -> None:
    store.write_text("k", "v")  # an S3Store now holds a boto3 client, which does not pickle
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_text("k") == "v" and clone.uri == store.uri


# -- local only ----------------------------------------------------------------------------------------------


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("d/part.parquet", b"old")
    seen = []
    real_fsync = os.fsync

    def fsync_while_looking(fd: int) -> None:  # runs while the new bytes sit in the temporary file
        if os.path.isfile(os.readlink(f"/proc/self/fd/{fd}")):
            seen.append((store.read_bytes("d/part.parquet"), store.list()))
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync_while_looking)
    store.write_bytes("d/part.parquet", b"new" * 100_000)
    assert seen == [(b"old", ["d/part.parquet"])]  # the final name showed the old object; no temp file listed
    assert store.read_bytes("d/part.parquet") == b"new" * 100_000


def test_local_failed_write_keeps_old_object_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("d/part.parquet", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", disk_full)
    with pytest.raises(StoreError, match=r"cannot write .*d/part.parquet: No space left on device"):
        store.write_bytes("d/part.parquet", b"new")
    monkeypatch.undo()
    assert store.read_bytes("d/part.parquet") == b"old"
    assert sorted(os.listdir(tmp_path / "d")) == ["part.parquet"]


def test_local_write_whose_rename_fails_leaves_no_temp_file(tmp_path: Path) -> None:
    """A key whose path is a directory: the data is written to a temporary file and the rename onto the
    directory fails; the write is refused naming the path and the temporary file goes with it."""
    store = LocalStore(tmp_path)
    store.write_bytes("d/sub/part.parquet", b"x")
    with pytest.raises(StoreError, match=r"cannot write .*/d/sub"):
        store.write_bytes("d/sub", b"new")
    assert sorted(os.listdir(tmp_path / "d")) == ["sub"], "no temporary file is left beside the key"
    assert store.list() == ["d/sub/part.parquet"]


def test_local_delete_prefix_of_a_folder_removes_its_empty_directories(tmp_path: Path) -> None:
    """As on S3, where a folder with no object is gone: deleting a run's prefix leaves no empty directory tree."""
    store = LocalStore(tmp_path / "root")
    fill(store)
    assert store.delete_prefix("a/") == 3
    assert not (store.root / "a").exists(), "the folder and its empty subfolders are removed"
    assert sorted(p.name for p in store.root.iterdir()) == ["ab.txt", "b.txt", "dir with space"]
    assert store.delete_prefix("ab") == 1 and (store.root / "dir with space").is_dir(), "not a folder prefix"


KILLED_BEFORE_RENAME = """
import os, sys, time
from pipeline.io.store import LocalStore


def wait_to_be_killed(*args):  # the temporary file is written and fsynced; the rename never comes
    print("written", flush=True)
    time.sleep(600)


os.replace = wait_to_be_killed
LocalStore(sys.argv[1]).write_bytes(sys.argv[2], bytes.fromhex(sys.argv[3]))
"""


def killed_before_rename(store: LocalStore, key: str, data: bytes) -> Path:
    """The temporary file that a write_bytes SIGKILLed between its write and its rename leaves behind."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BEFORE_RENAME, str(store.root), key, data.hex()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "written\n"
    finally:
        proc.kill()
        proc.wait()
    path = store.root / key
    (tmp,) = path.parent.glob(f"{store_module.TMP_PREFIX}{path.name}.*")
    return tmp


def test_local_remove_temp_files_deletes_the_old_leftovers_of_killed_writes(tmp_path: Path) -> None:
    """Never listed, so never cleaned by a rerun's deletes: remove_temp_files deletes those untouched for
    longer than the given age, anywhere below the root, and nothing else."""
    store = LocalStore(tmp_path / "root")
    fill(store)
    left = {
        key: killed_before_rename(store, key, data)
        for key, data in (("a/sub/x.bin", b"1" * 100), ("b.txt", b"2" * 20), ("a/1.txt", b"young"))
    }
    for key in ("a/sub/x.bin", "b.txt"):
        os.utime(left[key], (time.time() - 3600, time.time() - 3600))
    assert store.list() == sorted(KEYS) and all(path.exists() for path in left.values())
    assert store.remove_temp_files(older_than_s=60) == (2, 120)
    assert [path.exists() for path in left.values()] == [False, False, True], "a young one may be in flight"
    assert store.list() == sorted(KEYS) and all(store.read_bytes(k) == d for k, d in KEYS.items())
    assert store.remove_temp_files(older_than_s=0) == (1, 5)
    assert not left["a/1.txt"].exists() and store.list() == sorted(KEYS)


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../outside.txt", "a/../../outside.txt", "/etc/hostname"):
        with pytest.raises(StoreError, match="escapes the store root"):
            store.write_bytes(key, b"x")
    assert not (tmp_path / "outside.txt").exists()


def test_local_root_behind_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = LocalStore(tmp_path / "link" / "out")
    store.write_text("a/b.txt", "x")
    assert store.list() == ["a/b.txt"] and (tmp_path / "real" / "out" / "a" / "b.txt").read_text() == "x"


def test_local_check_writable_names_the_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = LocalStore(tmp_path / "file" / "out")
    with pytest.raises(StoreError, match=f"cannot write {tmp_path / 'file' / 'out'}"):
        store.check_writable()


@pytest.mark.parametrize("below", ["", "out"])
def test_local_output_that_is_a_file_says_so(tmp_path: Path, below: str) -> None:
    """output.uri naming a file (or a folder below one) was refused as "cannot write <uri>/.canvasflow-probe-..:
    File exists": the message names the file and asks for a directory."""
    (tmp_path / "file").write_text("not a directory")
    store = LocalStore(tmp_path / "file" / below if below else tmp_path / "file")
    with pytest.raises(StoreError) as error:
        store.check_writable()
    message = str(error.value)
    assert f"output location {store.uri} is not writable" in message
    assert f"{tmp_path / 'file'} is a file, not a directory" in message
    assert "give output.uri a directory" in message
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_write_below_a_file_names_the_file(tmp_path: Path) -> None:
    """A run directory that is a file (<output.uri>/<run.id>): taking the run lock said only "cannot write
    .../r1/_lock: File exists"."""
    (tmp_path / "r1").write_text("x")
    with pytest.raises(StoreError) as error:
        LocalStore(tmp_path).child("r1").write_text("_lock", "{}")
    assert f"cannot write {tmp_path / 'r1' / '_lock'}: " in str(error.value)
    assert str(error.value).endswith(f"({tmp_path / 'r1'} is a file, not a directory)")


# -- S3 only -------------------------------------------------------------------------------------------------

FAULTS = {
    "503-slowdown": lambda proxy, method: proxy.fail_next(2, 503, "SlowDown", method=method),
    "500-internal-error": lambda proxy, method: proxy.fail_next(2, 500, "InternalError", method=method),
    "dropped-mid-response": lambda proxy, method: proxy.drop_next(2, method=method),
}


@pytest.mark.s3
@pytest.mark.parametrize("fault", FAULTS)
def test_s3_calls_retry_through_faults(fault, s3_bucket, s3_fault_proxy, caplog) -> None:
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint)
    payload = os.urandom(300_000)
    operations = [  # (HTTP method, call, check); each call meets two faults, then goes through
        ("PUT", lambda: store.write_bytes("p/obj.bin", payload), lambda result: result is None),
        ("GET", lambda: store.read_bytes("p/obj.bin"), lambda result: result == payload),
        ("HEAD", lambda: store.exists("p/obj.bin"), lambda result: result is True),
        ("GET", lambda: store.list("p/"), lambda result: result == ["p/obj.bin"]),
        ("POST", lambda: store.delete(["p/obj.bin"]), lambda result: result is None),
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.io.s3"):
        for method, call, check in operations:
            s3_fault_proxy.reset_counts()
            FAULTS[fault](s3_fault_proxy, method)
            assert check(call()), method
            assert s3_fault_proxy.count() == 3, (method, s3_fault_proxy.requests)  # two faults, one success
            assert s3_fault_proxy.count(fault=None) == 1
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2 * len(operations)
    assert s3_bucket.keys() == []


@pytest.mark.s3
def test_a_conditional_write_answered_409_is_retried_a_bounded_number_of_times(
    s3_bucket, s3_fault_proxy, caplog
):
    """S3 answers 409 ConditionalRequestConflict to an If-None-Match PUT while another write of the key is in
    flight: retried with backoff like any transient error, up to max_attempts (it recursed without bound)."""
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint, max_attempts=4)
    s3_fault_proxy.fail_next(2, 409, "ConditionalRequestConflict", method="PUT")
    with caplog.at_level(logging.WARNING, logger="pipeline.io.s3"):
        assert store.write_if_absent("lock", b"mine") is True
    assert s3_fault_proxy.count("PUT") == 3 and store.read_bytes("lock") == b"mine"
    assert len([r for r in caplog.records if "ConditionalRequestConflict" in r.getMessage()]) == 2
    assert store.write_if_absent("lock", b"theirs") is False  # exists: 412 or the HEAD before it
    s3_fault_proxy.reset_counts()
    s3_fault_proxy.fail_next(100, 409, "ConditionalRequestConflict", method="PUT")
    with pytest.raises(
        StoreError, match=r"base/other \(if absent\) \(after 4 attempt\(s\)\): ConditionalRequestConflict"
    ):
        store.write_if_absent("other", b"x")
    s3_fault_proxy.clear_faults()
    assert s3_fault_proxy.count("PUT") == 4, "max_attempts, then the error"
    assert not store.exists("other")


@pytest.mark.s3
def test_a_conditional_write_that_loses_the_race_after_its_check_returns_false(s3_bucket, s3_fault_proxy):
    """Another writer creates the key between write_if_absent's HEAD and its PUT (here: the HEAD answered 404
    though the key exists): the PUT's If-None-Match is answered 412, which means "not created", not an error.
    A key seen to exist is never PUT at all (the only guard on stores that ignore If-None-Match)."""
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint)
    assert store.write_if_absent("_columns/c.json", b"first")
    s3_fault_proxy.reset_counts()
    assert store.write_if_absent("_columns/c.json", b"second") is False
    assert s3_fault_proxy.count("PUT") == 0, "an existing key is not written"
    s3_fault_proxy.fail_next(1, 404, "NoSuchKey", method="HEAD")
    assert store.write_if_absent("_columns/c.json", b"third") is False
    assert s3_fault_proxy.count("PUT") == 1 and store.read_bytes("_columns/c.json") == b"first"


@pytest.mark.s3
@pytest.mark.parametrize(
    "status, code", [(429, "TooManyRequests"), (408, "RequestTimeoutException"), (502, "BadGateway")]
)
def test_s3_throttling_and_server_statuses_are_retried_whatever_their_error_code(
    s3_bucket, s3_fault_proxy, status, code
):
    """Retried by HTTP status too (429, 408, 5xx): gateways in front of S3-compatible stores answer them with
    codes that are not in RETRYABLE_CODES."""
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint)
    s3_fault_proxy.fail_next(2, status, code, method="PUT")
    store.write_text("k", "v")
    assert s3_fault_proxy.count("PUT") == 3, "two answers retried, then written"
    assert store.read_text("k") == "v"


@pytest.mark.s3
def test_s3_download_cut_midway_is_retried_from_the_start_of_the_file(s3_bucket, s3_fault_proxy, tmp_path):
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint)
    payload = os.urandom(300_000)
    store.write_bytes("model.bin", payload)
    s3_fault_proxy.drop_next(1, method="GET")  # half the body, then the connection closes
    dest = tmp_path / "model.bin"
    assert store.download_file("model.bin", dest) == len(payload)
    assert s3_fault_proxy.count("GET", fault="drop") == 1
    assert dest.read_bytes() == payload, "the retry rewrote the file, not appended to the cut attempt"


@pytest.mark.s3
def test_s3_check_writable_removes_old_probes_and_keeps_another_processs_fresh_one(s3_bucket, monkeypatch):
    """A probe left by a process killed in check_writable is deleted once older than PROBE_STALE_S; a young
    one may be another process's check in flight and stays."""
    import pipeline.io.s3 as s3_module

    store = s3_bucket.store("base")
    store.write_bytes(".canvasflow-probe-1-1", b"ok")
    time.sleep(2.2)  # S3 ages objects by Last-Modified (1 s resolution)
    store.write_bytes(".canvasflow-probe-2-2", b"ok")
    monkeypatch.setattr(s3_module, "PROBE_STALE_S", 1.0)
    store.check_writable()
    assert store.list() == [".canvasflow-probe-2-2"]


@pytest.mark.s3
def test_a_key_that_delete_objects_failed_to_delete_is_deleted_again(s3_bucket, s3_fault_proxy, caplog):
    """DeleteObjects answers 200 and lists the keys it failed to delete (InternalError, SlowDown under load):
    they were reported as a StoreError at once (a nightly retention then exited 1 after a complete night)."""
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint)
    for name in ("a", "b", "c"):
        store.write_text(name, name)
    s3_fault_proxy.reset_counts()
    s3_fault_proxy.fail_a_key_of_next_delete(2)
    with caplog.at_level(logging.WARNING, logger="pipeline.io.s3"):
        store.delete(["a", "b", "c"])
    assert s3_fault_proxy.count("POST") == 3, "the key that failed, twice, then deleted"
    assert len([r for r in caplog.records if "InternalError" in r.getMessage()]) == 2
    assert s3_bucket.keys() == []
    store.write_text("d", "d")
    s3_fault_proxy.fail_a_key_of_next_delete(1, code="AccessDenied")  # not transient: reported at once
    with pytest.raises(StoreError, match=r"cannot delete 1 object\(s\) under .*base/d: AccessDenied"):
        store.delete(["d"])


@pytest.mark.s3
def test_s3_refused_connections_are_retried_until_the_endpoint_is_back(s3_bucket, s3_fault_proxy, caplog):
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint, max_attempts=30, max_delay_s=0.2)
    store.write_text("before", "x")  # boto3 now pools a keep-alive connection; the outage cuts it too
    s3_fault_proxy.reset_counts()
    started = time.monotonic()
    s3_fault_proxy.refuse_connections(1.5)
    with caplog.at_level(logging.WARNING, logger="pipeline.io.s3"):
        store.write_text("after", "y")
    assert time.monotonic() - started >= 1.4
    assert s3_fault_proxy.count("PUT") == 1  # refused attempts never got through; the retry did
    refused = [r for r in caplog.records if "EndpointConnectionError" in r.getMessage()]
    assert len(refused) >= 2
    assert s3_bucket.keys() == ["base/after", "base/before"]


@pytest.mark.s3
def test_s3_persistent_fault_gives_up_after_max_attempts(s3_bucket, s3_fault_proxy) -> None:
    store = s3_bucket.store("base", endpoint_url=s3_fault_proxy.endpoint, max_attempts=3)
    s3_fault_proxy.fail_next(100, 503, "SlowDown")
    started = time.monotonic()
    with pytest.raises(
        StoreError, match=r"cannot write s3://.*/base/k \(after 3 attempt\(s\)\): SlowDown"
    ) as error:
        store.write_text("k", "v")
    assert not error.value.refused, "throttling passes: a job goes on starting shards"
    assert s3_fault_proxy.count() == 3
    assert time.monotonic() - started < 5


@pytest.mark.s3
def test_s3_missing_bucket_fails_fast_naming_it(s3_env) -> None:
    store = S3Store("s3://no-such-bucket-7f3a/prefix", S3Options(endpoint_url=s3_env.endpoint))
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        store.write_text("k", "v")
    message = str(error.value)
    assert "s3://no-such-bucket-7f3a/prefix/k" in message and "NoSuchBucket" in message
    assert "(after 1 attempt(s))" in message and "bucket does not exist" in message
    assert error.value.refused, "a missing bucket stays missing: a job starts no more shards"
    with pytest.raises(StoreError, match=r"output location s3://no-such-bucket-7f3a/prefix \(endpoint http"):
        store.check_writable()
    assert time.monotonic() - started < 5


@pytest.mark.s3
@pytest.mark.parametrize(
    "variable, value, code",
    [
        ("AWS_SECRET_ACCESS_KEY", "wrong-secret-0f9e8d7c6b5a", "SignatureDoesNotMatch"),
        ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN0000", "InvalidAccessKeyId"),
    ],
)
def test_s3_bad_credentials_fail_fast_without_leaking_secrets(
    s3_bucket, monkeypatch, caplog, variable, value, code
) -> None:
    real_secret = s3_bucket.server.secret_key
    monkeypatch.setenv(variable, value)
    store = s3_bucket.store("base", max_attempts=8, base_delay_s=1.0)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreError) as error:
        store.check_writable()
    assert "(after 1 attempt(s))" in str(error.value), "refused credentials are not retried"
    message = str(error.value)
    assert s3_bucket.name in message and code in message and "check the credentials" in message
    for secret in (real_secret, "wrong-secret-0f9e8d7c6b5a"):
        assert secret not in message and secret not in caplog.text


@pytest.mark.s3
def test_s3_check_writable_on_an_unreachable_endpoint_names_the_location(s3_env) -> None:
    (port,) = free_ports(1)  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    store = S3Store(
        "s3://some-bucket/out", S3Options(endpoint_url=endpoint, max_attempts=2, base_delay_s=0.05)
    )
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        store.check_writable()
    message = str(error.value)
    assert "s3://some-bucket/out" in message and endpoint in message and "some-bucket" in message
    assert "after 2 attempt(s)" in message and "is the endpoint URL right" in message
    assert time.monotonic() - started < 5


@pytest.mark.s3
def test_s3_errors_drop_the_password_of_an_endpoint_from_aws_endpoint_url(
    s3_env, monkeypatch, caplog
) -> None:
    """AWS_ENDPOINT_URL=http://KEY:SECRET@host (botocore's own setting, which output.endpoint_url's check does not
    see) came back in "Could not connect to the endpoint URL: \"http://KEY:SECRET@127.0.0.1:...\"", logged as
    the job's start-up error."""
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://AKIAFAKE:CANARY-ep-secret@127.0.0.1:{port}")
    store = S3Store("s3://some-bucket/out", S3Options(max_attempts=1))
    with pytest.raises(StoreError) as error:
        store.list("")
    message = str(error.value)
    assert f"http://***@127.0.0.1:{port}/some-bucket" in message and "is the endpoint URL right" in message
    assert "CANARY" not in message + caplog.text and "AKIAFAKE" not in message + caplog.text


@pytest.mark.s3
def test_s3_list_and_delete_span_several_pages(s3_bucket) -> None:
    store = s3_bucket.store("many")
    keys = [f"k/{i:05d}" for i in range(1003)]  # > 1000: ListObjectsV2 pages and DeleteObjects batches
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.write_bytes(key, b"x"), keys))
    store.write_bytes("other", b"y")
    assert store.list("k/") == keys
    assert store.delete_prefix("k/") == len(keys)
    assert store.list() == ["other"]


@pytest.mark.s3
def test_s3_store_on_bucket_root(s3_bucket) -> None:
    s3_bucket.put("in/prompts.jsonl", b'{"prompt": "hi"}\n')
    store = s3_bucket.store()
    assert store.list() == ["in/prompts.jsonl"]
    assert store.read_bytes("in/prompts.jsonl") == b'{"prompt": "hi"}\n'


@pytest.mark.s3
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_seaweedfs_uses_loopback_only(seaweedfs) -> None:
    sockets = inet_sockets(seaweedfs.process.pid)
    assert len([s for s in sockets if s[2].endswith(":0")]) >= 8, sockets  # the listeners, at least
    loopback = ("127.0.0.1:", "::ffff:127.0.0.1:", "0.0.0.0:0", ":::0")
    for proto, local, remote in sockets:
        assert local.startswith(loopback[:2]) and remote.startswith(loopback), (proto, local, remote)


def test_seaweed_start_failure_shows_its_log_without_the_secret(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text(
        "#!/bin/sh\ncat s3.json\necho 'listen tcp 127.0.0.1:1: bind: address already in use'\nexit 3\n"
    )
    fake.chmod(0o755)
    with pytest.raises(SeaweedError) as error:
        start_seaweedfs(tmp_path / "work", weed=str(fake), timeout_s=20)
    message = str(error.value)
    assert "weed exited with status 3" in message and "address already in use" in message
    assert '"secretKey": "***"' in message
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["weed-0", "weed-1", "weed-2"]  # retried


@pytest.mark.s3
def test_an_unwritable_s3_output_names_the_environments_endpoint(s3_bucket, monkeypatch) -> None:
    """With output.endpoint_url unset, boto3 takes AWS_ENDPOINT_URL: the refusal named no endpoint, as if the
    output were on AWS. It names the URL (without its user:password@) and the variable."""
    host = s3_bucket.endpoint.removeprefix("http://")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:CANARY@{host}")
    store = S3Store(f"{s3_bucket.uri}-absent/out", S3Options(max_attempts=1))
    with pytest.raises(StoreError) as error:
        store.check_writable()
    message = str(error.value)
    assert f"{store.uri} (endpoint http://***@{host}, from AWS_ENDPOINT_URL) is not writable" in message
    assert "NoSuchBucket" in message and "CANARY" not in message
