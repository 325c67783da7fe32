"""What a folder input reads and what it skips: every JSON Lines name the reader decompresses is read, the
files it does not read are named in a warning (rows vanished with exit 0 before), symbolic links to folders
are followed once, and a broken link to a data file fails at start-up instead of dropping its rows."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input

LINE = json.dumps({"prompt": "Add: 1+2"}) + "\n"


def test_gzip_json_names_are_read_and_other_files_are_named_in_a_warning(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text(LINE)
    for name in ("b.json.gz", "d.ndjson.gz", "e.jsonl.gz"):
        (folder / name).write_bytes(gzip.compress(LINE.encode()))
    (folder / "c.jsonl.bz2").write_bytes(b"BZh9")
    (folder / "g.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (folder / "f.txt").write_text(LINE)
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden: skipped without a word, as before
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=str(folder)))
    assert [os.path.basename(f) for f in records.files] == [
        "a.jsonl",
        "b.json.gz",
        "d.ndjson.gz",
        "e.jsonl.gz",
    ]
    assert records.num_rows == 4 and records.num_errors == 0
    assert records.skipped_files == 3
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "3 file(s) skipped" in warning and "c.jsonl.bz2, f.txt, g.jsonl.zst" in warning
    assert ".jsonl.gz, .json.gz, .ndjson.gz" in warning and ".DS_Store" not in warning


def test_a_single_json_gz_file_is_read(tmp_path):
    path = tmp_path / "x.json.gz"
    path.write_bytes(gzip.compress(LINE.encode()))
    assert read_input(DataConfig(path=str(path))).num_rows == 1


def test_a_single_file_of_an_unknown_suffix_names_the_known_ones(tmp_path):
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(InputError, match=r"cannot tell the format from the file name \(known: \.jsonl, "):
        read_input(DataConfig(path=str(path)))


def test_symbolic_links_to_folders_are_followed_once(tmp_path, caplog):
    data = tmp_path / "elsewhere"
    data.mkdir()
    (data / "b.jsonl").write_text(LINE)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text(LINE)
    (folder / "linked").symlink_to(data)
    (folder / "loop").symlink_to(folder)  # would list the folder again and again
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=str(folder)))
    assert records.files == [str(folder / "a.jsonl"), str(folder / "linked" / "b.jsonl")]
    assert records.num_rows == 2
    assert any("loop" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_link_to_a_folder_that_holds_the_input_is_not_followed(tmp_path, caplog):
    """in/sub/up -> ../.. made the walk read every dataset beside the input (and, for a link to /, the whole
    filesystem): the loop check knew only the folders it had read already."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.jsonl").write_text(LINE)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(LINE)
    (folder / "sub" / "up").symlink_to(Path("..") / "..")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=str(folder)))
    assert records.files == [str(folder / "a.jsonl")]
    assert any("which holds" in r.getMessage() and "(a loop)" in r.getMessage() for r in caplog.records)


def test_a_link_to_a_folder_inside_the_input_leaves_the_rows_under_the_real_folder(tmp_path, caplog):
    """a_alias -> z_real: the rows were read under the link's path and z_real was called the link."""
    folder = tmp_path / "in"
    (folder / "z_real").mkdir(parents=True)
    (folder / "z_real" / "a.jsonl").write_text(LINE)
    (folder / "a_alias").symlink_to("z_real")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=str(folder)))
    assert records.files == [str(folder / "z_real" / "a.jsonl")] and records.num_rows == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warning.startswith(f"not following {folder / 'a_alias'}: it links to ") and "read already" in warning
    )


def test_a_saved_dataset_folder_gets_no_skipped_file_warning(tmp_path, caplog):
    """Its .arrow files are the data: the warning told users to rename them (none on S3)."""
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["Add: 1+2", "Add: 2+2"]}).save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=str(tmp_path / "saved")))
    assert records.num_rows == 2 and records.skipped_files == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_broken_link_to_a_data_file_fails_at_startup(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text(LINE)
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(InputError, match=r"b\.jsonl is a broken symbolic link \(to .*gone\.jsonl\)"):
        read_input(DataConfig(path=str(folder)))
    (folder / "b.jsonl").unlink()
    (folder / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not data: skipped, but named
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        assert read_input(DataConfig(path=str(folder))).skipped_files == 1
    assert any("notes.txt" in r.getMessage() for r in caplog.records)


@pytest.mark.s3
def test_objects_an_s3_prefix_does_not_read_are_named_in_a_warning(s3_bucket, caplog):
    s3_bucket.put("in/a.jsonl", LINE.encode())
    s3_bucket.put("in/b.json.gz", gzip.compress(LINE.encode()))
    s3_bucket.put("in/c.jsonl.zst", b"\x28\xb5\x2f\xfd")
    s3_bucket.put("in/_SUCCESS", b"")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.files"):
        records = read_input(DataConfig(path=f"{s3_bucket.uri}/in"), endpoint_url=s3_bucket.endpoint)
    assert records.files == [f"{s3_bucket.uri}/in/a.jsonl", f"{s3_bucket.uri}/in/b.json.gz"]
    assert records.num_rows == 2 and records.skipped_files == 1  # a marker such as _SUCCESS is not counted
    assert any(
        "1 file(s) skipped" in r.getMessage()
        and "c.jsonl.zst" in r.getMessage()
        and "_SUCCESS" not in r.getMessage()
        for r in caplog.records
    )
