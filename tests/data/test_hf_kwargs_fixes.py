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
