"""The driver's records live in a memory-mapped spill file, and the duplicate-id check keeps a hash per row; the
records equal those of an in-memory check over every id."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import pyarrow as pa
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data import records as records_module
from pipeline.data.readers import InputError, read_input
from pipeline.data.records import SPILL_PREFIX, RecordBuilder


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """TMPDIR pointed at a fresh folder (tempfile caches its choice: reset it)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return folder


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_records_are_memory_mapped_from_a_spill_file_that_is_removed(tmp_path, tmpdir_env, monkeypatch):
    monkeypatch.setattr(records_module, "BATCH_ROWS", 500)
    path = _jsonl(tmp_path / "in.jsonl", [{"prompt": f"Write about {i} " + "x" * 200} for i in range(3000)])
    before = pa.total_allocated_bytes()
    records = read_input(DataConfig(path=path))
    # Arrow's memory pool holds none of the table: its buffers point into the mapped file.
    assert records.table.nbytes > 600_000
    assert pa.total_allocated_bytes() - before < records.table.nbytes / 20
    assert len(records.table.column("id").chunks) == 6
    assert records.table.column("prompt")[2999].as_py().startswith("Write about 2999 ")
    assert os.listdir(tmpdir_env) == []  # unlinked once mapped; the mapping keeps the pages


def test_a_temporary_folder_that_cannot_take_the_records_is_a_clear_input_error(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(missing))  # else it falls back to /tmp
    path = _jsonl(tmp_path / "in.jsonl", [{"prompt": "Add: 1+2"}])
    with pytest.raises(
        InputError, match=f"cannot write the input's records to the temporary folder {missing}.*TMPDIR"
    ):
        read_input(DataConfig(path=path))


def test_a_read_that_fails_leaves_no_spill_file(tmp_path, tmpdir_env, monkeypatch):
    monkeypatch.setattr(records_module, "BATCH_ROWS", 2)
    (tmp_path / "in").mkdir()
    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(InputError):
        read_input(DataConfig(path=str(tmp_path / "in")))
    assert not [n for n in os.listdir(tmpdir_env) if n.startswith(SPILL_PREFIX)]


def test_input_is_read_again_only_when_ids_repeat(tmp_path, tmpdir_env, caplog):
    unique = _jsonl(tmp_path / "u.jsonl", [{"id": f"u{i}", "prompt": f"p{i}"} for i in range(50)])
    repeated = _jsonl(tmp_path / "r.jsonl", [{"id": f"r{i % 30}", "prompt": f"p{i}"} for i in range(50)])
    with caplog.at_level(logging.INFO):
        assert read_input(DataConfig(path=unique, id_column="id")).num_errors == 0
        assert "reading it again" not in caplog.text
        records = read_input(DataConfig(path=repeated, id_column="id"))
    assert "20 id(s) may occur more than once in the input: reading it again" in caplog.text
    errors = [r for r in records.table.to_pylist() if r["error"]]
    assert [r["source_index"] for r in errors] == list(range(30, 50))
    assert errors[0]["error"] == "duplicate id 'r0' (first seen at input row 0)"
    assert json.loads(errors[0]["raw"]) == {"id": "r0", "prompt": "p30"}


def test_tracking_ids_that_do_not_repeat_changes_nothing(tmp_path):
    """A hash clash names ids that do not repeat; checking them anyway gives the same records."""
    data = DataConfig(path="-", id_column="id")
    rows = [{"id": f"i{i % 4}" if i % 3 else f"solo{i}", "prompt": f"p{i}"} for i in range(12)]

    def build(repeated):
        builder = RecordBuilder(data, repeated=repeated)
        for index, row in enumerate(rows):
            builder.add(index, row, None, None)
        return builder.finish().to_pylist(), builder.fingerprint()

    counts = {rid: sum(r["id"] == rid for r in rows) for rid in {r["id"] for r in rows}}
    repeating = frozenset(rid for rid, n in counts.items() if n > 1)
    assert repeating == {"i0", "i1", "i2", "i3"}  # the solo ids occur once
    records, fingerprint = build(repeating)
    assert (records, fingerprint) == build(
        frozenset(counts)
    )  # every id tracked: same records and fingerprint
    assert sum(r["error"] is not None for r in records) == 4  # the second row of each i-id


def test_the_spill_file_has_no_name_while_the_input_is_read(tmpdir_env, monkeypatch):
    """Unlinked at creation: a driver killed mid-read (SIGKILL, out of memory) leaves nothing in TMPDIR."""
    monkeypatch.setattr(records_module, "BATCH_ROWS", 2)
    builder = RecordBuilder(DataConfig(path="-"))
    for index in range(7):
        builder.add(index, {"prompt": f"p{index}"}, None, None)
    assert builder.written == 3 and builder.spill.bytes > 0
    assert os.listdir(tmpdir_env) == []
    table = builder.finish()
    assert table.column("prompt").to_pylist() == [f"p{i}" for i in range(7)]


def test_an_input_that_changes_between_the_two_reads_is_refused(tmp_path, monkeypatch):
    """The ids to mark come from the first read, the records from the second: they must be the same rows
    (a file rewritten in between gave two valid rows with one id, unmarked)."""
    from pipeline.data import readers

    path = tmp_path / "in.jsonl"
    _jsonl(path, [{"id": i, "prompt": f"p{n}"} for n, i in enumerate(["a", "b", "a"])])
    build = readers._build

    def build_then_rewrite(*args, **kwargs):
        result = build(*args, **kwargs)
        _jsonl(path, [{"id": i, "prompt": f"p{n}"} for n, i in enumerate(["a", "b", "b"])])
        return result

    monkeypatch.setattr(readers, "_build", build_then_rewrite)
    with pytest.raises(InputError, match=r"changed while it was read: row 2 has another id"):
        read_input(DataConfig(path=str(path), id_column="id"))


def test_download_folders_left_by_killed_reads_are_removed_after_a_day(tmp_path):
    from pipeline.data.readers import remove_stale_downloads

    old = time.time() - 2 * 24 * 3600
    for name, stale in (
        ("canvasflow-input-a1", True),
        ("canvasflow-dataset-b2", True),
        ("canvasflow-input-c3", False),
    ):
        folder = tmp_path / name
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "data.arrow").write_bytes(b"x")
        if stale:
            for path in (folder / "train" / "data.arrow", folder / "train", folder):
                os.utime(path, (old, old))
    (tmp_path / "other-tool-d4").mkdir()
    os.utime(tmp_path / "other-tool-d4", (old, old))
    assert remove_stale_downloads(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["canvasflow-input-c3", "other-tool-d4"]


def _build(prompts: list[str]) -> tuple[pa.Table, str]:
    builder = RecordBuilder(DataConfig())
    for index, prompt in enumerate(prompts):
        builder.add(index, {"prompt": prompt}, None, None)
    return builder.finish(), builder.fingerprint()


def test_a_batch_is_cut_before_its_text_passes_the_character_limit(tmpdir_env, monkeypatch):
    """An Arrow string column holds at most 2 GiB: the records of 65,536 rows of 33 KB documents failed to
    become one batch ("Cannot convert pyarrow.lib.ChunkedArray to pyarrow.lib.Array"). A batch is cut before
    its text passes records.BATCH_CHARS (2**28 characters, at most 1 GiB of UTF-8), here lowered to 200; a
    row over it is a batch of its own. The records and the fingerprint are those of one batch."""
    assert records_module.BATCH_CHARS * 4 < 2**31  # 4 UTF-8 bytes per character at most
    prompts = ["a" * 60, "b" * 60, "c" * 60, "d" * 500, "e" * 10, "f" * 10]
    whole, whole_fingerprint = _build(prompts)
    assert [len(chunk) for chunk in whole.column("prompt").chunks] == [6]
    monkeypatch.setattr(records_module, "BATCH_CHARS", 200)
    table, fingerprint = _build(prompts)
    # Each record's text is its prompt plus its 16-character id: 76 + 76 fit, a third would pass 200.
    assert [len(chunk) for chunk in table.column("prompt").chunks] == [2, 1, 1, 2]
    assert table.to_pylist() == whole.to_pylist() and fingerprint == whole_fingerprint
