"""`data.split` names a split of a saved DatasetDict; on a saved Dataset, which has no splits, it read the whole
dataset whatever split was asked (e.g. data.split=test ran on the training rows). It now fails at start-up."""

from __future__ import annotations

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def test_split_of_a_saved_dataset_without_splits_fails_at_startup(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["Add: 1+2", "Add: 3+4"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InputError, match=r"data\.split='test'.*has no splits"):
        read_input(DataConfig(path=str(tmp_path / "ds"), split="test"))
    assert read_input(DataConfig(path=str(tmp_path / "ds"))).num_rows == 2


def test_split_of_a_saved_dataset_dict_is_read(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"prompt": ["Add: 1+2", "Add: 3+4"]})
    DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert read_input(DataConfig(path=str(tmp_path / "dd"), split="test")).num_rows == 1


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_split_of_jsonl_or_parquet_files_fails_at_startup(tmp_path, suffix):
    """data.split=test on a JSONL or Parquet input was ignored: the job ran on every row of the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"in.{suffix}"
    if suffix == "jsonl":
        path.write_text('{"prompt": "Add: 1+2"}\n')
    else:
        pq.write_table(pa.table({"prompt": ["Add: 1+2"]}), path)
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(path), split="test"))
    assert str(error.value).startswith(
        f"data.split='test' picks a split of a Hugging Face dataset, but data.path={str(path)!r} is {suffix} "
        "input, which has no splits: unset data.split"
    )
    assert read_input(DataConfig(path=str(path))).num_rows == 1


def test_an_empty_saved_dataset_says_it_holds_no_rows(tmp_path):
    """save_to_disk of a dataset of no rows writes no data file, and load_from_disk then fails: the job
    said "cannot load the saved dataset at ...: list index out of range"."""
    from datasets import Dataset

    Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(tmp_path / "ds")))
    assert str(error.value) == (
        f"data.path={str(tmp_path / 'ds')!r} holds no rows: the dataset saved there is empty (save_to_disk "
        "wrote no data file for it)"
    )


def test_a_saved_dataset_dict_with_an_empty_split_names_it_and_the_folder_of_the_split_asked(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"prompt": ["Add: 1+2"]})
    DatasetDict({"train": rows, "test": rows.select([])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(tmp_path / "dd"), split="train"))
    assert str(error.value) == (
        f"the dataset saved at {tmp_path / 'dd'} has empty split(s) 'test' (save_to_disk wrote no data file for "
        f"them, and datasets cannot load the dataset back): point data.path at the folder of split 'train' "
        f"({tmp_path / 'dd' / 'train'})"
    )
    assert read_input(DataConfig(path=str(tmp_path / "dd" / "train"))).num_rows == 1
