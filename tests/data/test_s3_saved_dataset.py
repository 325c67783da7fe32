"""A Hugging Face dataset saved with `save_to_disk` and copied to S3 reads as the same local directory does
(it was refused: "hf_disk reads local directories"). Runs against a real SeaweedFS."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def _upload(s3_bucket, folder, prefix: str) -> int:
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                s3_bucket.put(f"{prefix}/{os.path.relpath(path, folder)}", f.read())
            count += 1
    return count


@pytest.mark.s3
def test_a_saved_dataset_dict_on_s3_reads_as_the_local_one(s3_bucket, tmp_path, monkeypatch, caplog):
    from datasets import Dataset, DatasetDict

    train = Dataset.from_dict({"question": [f"Add: {i}+{i}" for i in range(40)] + [""], "k": list(range(41))})
    DatasetDict({"train": train, "test": train.select([0, 1, 2])}).save_to_disk(str(tmp_path / "dd"))
    assert (
        _upload(s3_bucket, tmp_path / "dd", "in/dd") >= 6
    )  # dataset_dict.json, per split: state, info, arrow
    s3_bucket.put("in/dd-old/train/x.jsonl", b'{"question": "not part of it"}\n')
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    caplog.set_level(logging.INFO)
    for split, rows in (("train", 41), ("test", 3)):
        config = {"prompt_column": "question", "split": split}
        remote = read_input(
            DataConfig(path=f"{s3_bucket.uri}/in/dd", **config), endpoint_url=s3_bucket.endpoint
        )
        local = read_input(DataConfig(path=str(tmp_path / "dd"), **config))
        assert remote.format == "hf_disk" and remote.num_rows == rows
        assert remote.table.to_pylist() == local.table.to_pylist() and remote.fingerprint == local.fingerprint
        # the files the manifest lists: every file of the dataset, its .arrow data included (locally only its
        # two JSON files were listed)
        names = [f.removeprefix(f"{s3_bucket.uri}/in/dd/") for f in remote.files]
        assert names == [str(Path(f).relative_to(tmp_path / "dd")) for f in local.files]
        assert any(n.startswith(f"{split}/data-") and n.endswith(".arrow") for n in names), names
    assert remote.num_errors == 0 and local.num_errors == 0
    assert f"downloading the saved dataset {s3_bucket.uri}/in/dd (" in caplog.text
    assert os.listdir(tmpdir) == []  # the download and the record spill are both gone
    with pytest.raises(InputError, match=rf"{s3_bucket.uri}/in/dd has splits \['train', 'test'\]"):
        read_input(
            DataConfig(path=f"{s3_bucket.uri}/in/dd", prompt_column="question"),
            endpoint_url=s3_bucket.endpoint,
        )


@pytest.mark.s3
def test_a_saved_dataset_on_s3_with_a_missing_file_fails_naming_the_prefix(s3_bucket, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["Add: 1+2", "Add: 3+4"]}).save_to_disk(str(tmp_path / "ds"))
    _upload(s3_bucket, tmp_path / "ds", "in/ds")
    arrow = next(n for n in os.listdir(tmp_path / "ds") if n.endswith(".arrow"))
    s3_bucket.server.client().delete_object(Bucket=s3_bucket.name, Key=f"in/ds/{arrow}")
    with pytest.raises(InputError, match=rf"cannot load the saved dataset at {s3_bucket.uri}/in/ds"):
        read_input(DataConfig(path=f"{s3_bucket.uri}/in/ds"), endpoint_url=s3_bucket.endpoint)


@pytest.mark.s3
def test_folder_markers_are_skipped_and_a_key_that_maps_outside_is_refused(s3_bucket, tmp_path):
    from datasets import Dataset

    from pipeline.data.hf_datasets import download_prefix

    Dataset.from_dict({"prompt": ["Add: 1+2", "Add: 3+4"]}).save_to_disk(str(tmp_path / "ds"))
    _upload(s3_bucket, tmp_path / "ds", "in/ds")
    s3_bucket.put("in/ds/", b"")  # what an S3 console's "Create folder" makes
    s3_bucket.put("in/ds/sub/", b"")
    records = read_input(DataConfig(path=f"{s3_bucket.uri}/in/ds"), endpoint_url=s3_bucket.endpoint)
    assert records.num_rows == 2 and not any(f.endswith("/") for f in records.files)

    # A key like in/ds//etc/x: joined naively it is the absolute path /etc/x.
    target = tmp_path / "outside"
    for bad in (f"/{target}/x", "../x", "./x"):
        with pytest.raises(InputError, match="does not map to a file below it"):
            download_prefix(
                f"{s3_bucket.uri}/in/ds", [f"{s3_bucket.uri}/in/ds/{bad}"], str(tmp_path / "dl"), None, None
            )
    assert not target.exists()
