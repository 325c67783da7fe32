"""A directory (or S3 folder) input skips hidden files and folders, as pyarrow datasets and Hugging Face
`datasets` do: a Jupyter `.ipynb_checkpoints/` copy silently doubled every prompt of the folder it sits in, and
a macOS `._name.jsonl` (AppleDouble) file failed the job as not JSON Lines."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import read_input

LINE = json.dumps({"prompt": "Add: 1+2"}) + "\n"


def test_hidden_files_and_folders_of_a_directory_are_skipped(tmp_path):
    (tmp_path / "in" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(LINE)
    (tmp_path / "in" / "sub" / "b.jsonl").write_text(LINE)
    (tmp_path / "in" / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text(LINE)
    (tmp_path / "in" / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    records = read_input(DataConfig(path=str(tmp_path / "in")))
    assert records.files == [str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "sub" / "b.jsonl")]
    assert records.num_rows == 2 and records.num_errors == 0


def test_a_directory_below_a_hidden_one_is_read(tmp_path):
    """Only names below data.path count: the input may itself live in a hidden folder."""
    folder = tmp_path / ".data" / "in"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text(LINE)
    assert read_input(DataConfig(path=str(folder))).num_rows == 1


def test_a_hidden_file_named_as_data_path_is_read(tmp_path):
    (tmp_path / ".p.jsonl").write_text(LINE)
    assert read_input(DataConfig(path=str(tmp_path / ".p.jsonl"))).num_rows == 1


@pytest.mark.s3
def test_hidden_objects_under_an_s3_folder_are_skipped(s3_bucket):
    s3_bucket.put("in/a.jsonl", LINE.encode())
    s3_bucket.put("in/.ipynb_checkpoints/a-checkpoint.jsonl", LINE.encode())
    s3_bucket.put("in/._a.jsonl", b"\x00\x05\x16\x07")
    records = read_input(DataConfig(path=f"{s3_bucket.uri}/in"), endpoint_url=s3_bucket.endpoint)
    assert records.files == [f"{s3_bucket.uri}/in/a.jsonl"]
