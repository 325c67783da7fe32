"""data.format=hf arguments that crashed the job or leaked a password: streaming=true ended in an
AttributeError traceback (an IterableDataset has no table), and a user:password@ inside a data_files URL was
echoed in the error, as data_files is kept in messages to name the missing file."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


@pytest.mark.parametrize("split", ["train", None])
def test_streaming_fails_at_startup_saying_to_remove_it(tmp_path, split):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    data = DataConfig(
        path="hf:json", format="hf", split=split, hf_kwargs={"data_files": str(path), "streaming": True}
    )
    with pytest.raises(InputError, match=r"data\.hf_kwargs\.streaming=true is not supported.*remove"):
        read_input(data)
    data.hf_kwargs["streaming"] = False  # the same input without it is read
    assert read_input(data).num_rows == 1


def test_a_password_in_a_data_files_url_is_not_echoed():
    url = "http://bot:SECRETURL@127.0.0.1:1/x.jsonl"
    with pytest.raises(InputError) as info:
        read_input(DataConfig(path="hf:json", format="hf", hf_kwargs={"data_files": url}))
    message = str(info.value)
    assert "SECRETURL" not in message and "bot:" not in message
    assert "http://***@127.0.0.1:1/x.jsonl" in message, "the file is still named"


@pytest.mark.parametrize("key", ["split", "path"])
def test_a_split_or_path_given_twice_differently_fails_at_startup(tmp_path, key):
    """data.split=test with data.hf_kwargs.split=train read the train split, and data.path=hf:parquet with
    data.hf_kwargs.path=json loaded with json: the value in hf_kwargs won, the other was ignored."""
    files = {}
    for split, prompts in (("train", ["Add: 1+2"]), ("test", ["Add: 3+4", "Add: 5+6"])):
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    given, other = {"split": ("test", "train"), "path": ("hf:parquet", "json")}[key]
    data = DataConfig(path="hf:json", format="hf", split="test", hf_kwargs={"data_files": files})
    setattr(data, key, given)
    data.hf_kwargs[key] = other
    with pytest.raises(InputError) as info:
        read_input(data)
    assert str(info.value) == (
        f"data.{key}={given!r} and data.hf_kwargs.{key}={other!r} disagree: both give load_dataset's {key}; "
        "set it in one of them"
    )
    data.path, data.split = "hf:json", "test"
    data.hf_kwargs[key] = {"split": "test", "path": "json"}[key]  # the same value twice: read
    assert read_input(data).num_rows == 2
