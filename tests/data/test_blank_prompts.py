"""A prompt that shows nothing, only NUL or zero-width characters (which str.strip() keeps), was generated
from as if it were text; it is an error row as an empty prompt is, in a prompt column, a chat message and a
prompt given to the Python API. Text with such characters among others is a prompt as before."""

from __future__ import annotations

import json

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import read_input
from pipeline.data.values import check_prompt_value

BLANK = ["\x00", "\x00\x00 \x00", "\u200b", "\ufeff\n", "\u2060\u200d"]


def _rows(tmp_path, rows: list[dict], **config) -> list[dict]:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_input(DataConfig(path=str(path), **config)).table.to_pylist()


def test_a_prompt_of_only_nul_or_zero_width_characters_is_an_error_row(tmp_path):
    rows = _rows(tmp_path, [{"prompt": text} for text in [*BLANK, "a\x00b", "\u200bHi"]])
    assert [r["error"] for r in rows[:1]] == [
        "prompt (column 'prompt') is blank: it holds only \\x00 (NUL or zero-width characters)"
    ]
    assert all("is blank: it holds only" in r["error"] for r in rows[: len(BLANK)])
    assert [(r["prompt"], r["error"]) for r in rows[len(BLANK) :]] == [("a\x00b", None), ("\u200bHi", None)]


def test_a_chat_message_of_only_zero_width_characters_is_an_error_row(tmp_path):
    rows = _rows(
        tmp_path, [{"messages": [{"role": "user", "content": "\u200b"}]}], messages_column="messages"
    )
    assert (
        rows[0]["error"]
        == "messages[0].content is blank: it holds only \\u200b (NUL or zero-width characters)"
    )


@pytest.mark.parametrize("text", BLANK)
def test_the_api_refuses_the_same_prompts(text):
    assert check_prompt_value(text)[2].startswith("prompt is blank: it holds only")
    assert check_prompt_value([{"role": "user", "content": text}])[2].startswith(
        "messages[0].content is blank"
    )


def test_an_id_of_only_nul_or_zero_width_characters_is_an_error_row(tmp_path):
    """data.id_column's "\\u200b" or " \\x00" was taken as the row's id (only an empty or whitespace id was
    refused): an id that shows nothing, in the output and in errors/. It is an error row as such a prompt is;
    ids with such characters among others, and the empty id's message, are as before."""
    rows = _rows(
        tmp_path,
        [{"prompt": "Hi", "uid": text} for text in [*BLANK, " ", "a\u200b", "\x00b"]],
        id_column="uid",
    )
    assert (
        rows[2]["error"]
        == "id in column 'uid' is blank: it holds only \\u200b (NUL or zero-width characters)"
    )
    assert all("is blank: it holds only" in r["error"] for r in rows[: len(BLANK)])
    assert rows[len(BLANK)]["error"] == "empty id (column 'uid')"
    assert [(r["id"], r["error"]) for r in rows[len(BLANK) + 1 :]] == [("a\u200b", None), ("\x00b", None)]


@pytest.mark.parametrize("text", BLANK)
def test_the_api_refuses_the_same_ids(text):
    from pipeline.llm import _id_list

    with pytest.raises(ValueError, match=r"^ids\[1\]=.* is blank: it holds only"):
        _id_list(["a", text], 2)
