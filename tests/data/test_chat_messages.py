"""Chat messages as OpenAI and Hugging Face datasets write them: a message's content may be a list of text
parts, joined into one text; a part of another type (an image, audio) or a malformed part is an error row
naming it. A message's other keys (name, tool_calls, ...) reach the chat template. Inputs whose messages were
already accepted give the same records and fingerprint as before."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.prompts import render_prompt
from pipeline.data.readers import read_input
from pipeline.data.values import SURROGATE_HINT, check_prompt_value

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "tiny-diffusiongemma"


def _read(tmp_path, rows: list[dict]):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_input(DataConfig(path=str(path), messages_column="messages"))


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _chat(content) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]}


def test_text_parts_are_joined_into_the_message_text_one_per_line(tmp_path):
    rows = _read(
        tmp_path,
        [_chat([_text("Hi"), _text("there")]), _chat([_text("Add: 1+2")]), _chat("Add: 1+2")],
    ).table.to_pylist()
    assert [r["error"] for r in rows] == [None, None, None]
    assert json.loads(rows[0]["prompt"])[1] == {"role": "user", "content": "Hi\nthere"}
    assert rows[1]["prompt"] == rows[2]["prompt"], "one text part is the message's text, as a string is"


def test_parquet_text_parts_with_the_null_fields_of_other_part_types_are_text(tmp_path):
    """A Parquet (or Hugging Face) parts column is a struct of every part type's fields: a text part holds
    image_url: null, which is not an image."""
    part = pa.struct(
        [("type", pa.string()), ("text", pa.string()), ("image_url", pa.struct([("url", pa.string())]))]
    )
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    chats = [
        [{"role": "user", "content": [{"type": "text", "text": "Add: 1+2", "image_url": None}]}],
        [{"role": "user", "content": [{"type": "image_url", "text": None, "image_url": {"url": "a.png"}}]}],
    ]
    pq.write_table(pa.table({"messages": pa.array(chats, pa.list_(message))}), tmp_path / "in.parquet")
    rows = read_input(
        DataConfig(path=str(tmp_path / "in.parquet"), messages_column="messages")
    ).table.to_pylist()
    assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "Add: 1+2"}]
    assert rows[1]["error"].startswith(
        "messages[0].content[0] is a part of type 'image_url'; only text parts"
    )


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (
            [_text("What is in"), {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}],
            "messages[1].content[1] is a part of type 'image_url'; only text parts "
            '({"type": "text", "text": "..."}) are supported: drop the other parts from the input, or give '
            "what they hold as text",
        ),
        (
            [{"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}],
            "messages[1].content[0] is a part of type 'input_audio'; only text parts",
        ),
        (
            [_text("a"), "b"],
            'messages[1].content[1] is a str; a content part is an object such as {"type": "text", "text": "..."}',
        ),
        (
            [{"text": "no type"}],
            "messages[1].content[0] is an object without a string 'type'; a content part",
        ),
        ([None], "messages[1].content[0] is null; a content part"),
        ([{"type": "text", "text": None}], "messages[1].content[0].text is null"),
        ([{"type": "text", "text": 7}], "messages[1].content[0].text must be a string, got int"),
        ([{"type": "text"}], "messages[1].content[0].text is null"),
        ([], "messages[1].content is an empty list of parts; give the text as a string or as text parts"),
        ([_text(" "), _text("\u200b")], "messages[1].content is blank: it holds only"),
        ([_text(""), _text("")], "messages[1].content is empty"),
    ],
)
def test_a_part_that_is_not_text_or_is_malformed_is_an_error_row_naming_it(tmp_path, content, error):
    rows = _read(tmp_path, [_chat(content), _chat("ok")]).table.to_pylist()
    assert rows[0]["error"].startswith(error) and rows[0]["raw"]
    assert rows[1]["error"] is None, "the other rows generate"
    assert check_prompt_value(_chat(content)["messages"])[2].startswith(error), "the Python API says the same"


def test_the_api_takes_text_parts_as_the_job_does(tmp_path):
    text, is_chat, problem = check_prompt_value([{"role": "user", "content": [_text("Hi"), _text("there")]}])
    assert (is_chat, problem) == (True, None)
    assert json.loads(text) == [{"role": "user", "content": "Hi\nthere"}]


def test_messages_that_were_accepted_before_keep_their_records_and_fingerprint(tmp_path):
    """Pinned: the fingerprint names the input in the run's identity, so a change would refuse resuming runs
    started before. Parquet messages hold every struct field; a null `name` is no key."""
    rows = [
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add: 1+2"}],
            "n": 1,
        },
        {
            "messages": [
                {"role": "user", "content": "caf\u00e9 \u2603"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": 5}]},
    ]
    records = _read(tmp_path, rows)
    assert records.fingerprint == "93b786ca9e24ac57c3c030d5d8cc38657b1de60149f757b6f5d6e881773e8552"
    assert records.table.column("prompt").to_pylist()[:2] == [
        '[{"content": "Be brief.", "role": "system"}, {"content": "Add: 1+2", "role": "user"}]',
        '[{"content": "café ☃", "role": "user"}, {"content": "ok", "role": "assistant"}]',
    ]
    message = pa.struct([("role", pa.string()), ("content", pa.binary()), ("name", pa.string())])
    chats = [
        [{"role": "user", "content": b"Add: 1+2", "name": None}],
        [{"role": "system", "content": b"S", "name": None}, {"role": "user", "content": b"hi", "name": None}],
    ]
    pq.write_table(pa.table({"chat": pa.array(chats, pa.list_(message))}), tmp_path / "in.parquet")
    records = read_input(DataConfig(path=str(tmp_path / "in.parquet"), messages_column="chat"))
    assert records.fingerprint == "f563796f508e9d23142a8f49b42e9d8decc6aacb4de16f0dbfaa4a283ddb7f92"
    assert records.table.column("prompt").to_pylist() == [
        '[{"content": "Add: 1+2", "role": "user"}]',
        '[{"content": "S", "role": "system"}, {"content": "hi", "role": "user"}]',
    ]


NAMED = (
    "{% for m in messages %}{{ m['role'] }}{% if m.name %}({{ m.name }}){% endif %}"
    "{% if m.tool_calls %}[{{ m.tool_calls[0].function.name }}]{% endif %}"
    "{% if 'tool_call_id' in m %}<{{ m.tool_call_id }}>{% endif %}:{{ m['content'] }}|{% endfor %}"
)
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}


def test_a_messages_other_keys_reach_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    chat = [
        {"role": "user", "name": "alice", "content": "Add 1 and 2"},
        {"role": "assistant", "content": "Calling add.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    rows = _read(tmp_path, [{"messages": chat}]).table.to_pylist()
    assert json.loads(rows[0]["prompt"]) == chat
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    tokenizer.chat_template = NAMED
    text = render_prompt(tokenizer, rows[0]["prompt"], is_chat=True, apply_chat_template=True)
    assert text == "user(alice):Add 1 and 2|assistant[add]:Calling add.|tool<c1>:3|"
    assert check_prompt_value(chat)[0] == rows[0]["prompt"], "the Python API passes them on too"


def test_a_null_key_of_a_parquet_message_is_no_key_and_a_value_json_cannot_hold_is_an_error_row(tmp_path):
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.binary())])
    chats = [
        [
            {"role": "user", "content": "Hi", "name": b"alice"},
            {"role": "user", "content": "Hey", "name": None},
        ],
        [{"role": "user", "content": "Hi", "name": b"\xff"}],
    ]
    pq.write_table(pa.table({"messages": pa.array(chats, pa.list_(message))}), tmp_path / "in.parquet")
    rows = read_input(
        DataConfig(path=str(tmp_path / "in.parquet"), messages_column="messages")
    ).table.to_pylist()
    assert json.loads(rows[0]["prompt"]) == [
        {"role": "user", "content": "Hi", "name": "alice"},
        {"role": "user", "content": "Hey"},
    ]
    assert rows[1]["error"] == (
        "messages[0].name holds binary data that is not UTF-8 text (byte 0 of the value); give it as text"
    )
    assert check_prompt_value([{"role": "user", "content": "Hi", "name": "\ud800"}])[2] == (
        f"messages[0].name is {SURROGATE_HINT}"
    )


# A template that tells null content from text as DeepSeek-V3/R1's do: transformers drops a null key before
# rendering, so a tool-call message given content None failed here (UndefinedError) where "" renders.
CONCATENATED = (
    "{% for m in messages %}{% if 'tool_calls' in m %}{% if m['content'] is none %}<A><calls>"
    "{% else %}{{ '<A>' + m['content'] + '<calls>' }}{% endif %}{{ m['tool_calls'][0]['function']['name'] }}"
    "{% else %}{{ m['role'] + ':' + m['content'] }}{% endif %}|{% endfor %}"
)


def _tool_chat(**content) -> list[dict]:
    return [
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", **content, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]


def test_an_assistant_tool_call_without_text_reaches_the_chat_template_with_empty_content(tmp_path):
    """OpenAI's tool-call form, {"role": "assistant", "content": null, "tool_calls": [...]}, was an error row
    ("messages[1].content is null"). With a non-empty tool_calls list, a null, absent or blank content (or no
    parts) is "": Llama 4's template (shipped with transformers) writes the call, and a template that adds the
    content to the call's text renders it too."""
    from transformers import AutoTokenizer
    from transformers.models.llama4.processing_llama4 import chat_template as llama4_template

    forms = [{"content": None}, {}, {"content": ""}, {"content": []}]
    rows = _read(tmp_path, [{"messages": _tool_chat(**form)} for form in forms]).table.to_pylist()
    assert [r["error"] for r in rows] == [None] * 4
    assert {r["prompt"] for r in rows} == {rows[0]["prompt"]}, "each form is the same record"
    assert json.loads(rows[0]["prompt"]) == _tool_chat(content="")
    assert check_prompt_value(_tool_chat(content=None))[0] == rows[0]["prompt"], (
        "the Python API says the same"
    )
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    tokenizer.chat_template = llama4_template
    text = render_prompt(tokenizer, rows[0]["prompt"], is_chat=True, apply_chat_template=True)
    assert '<|python_start|><|python_end|>{"name": "add", "parameters": "{\\"a\\": 1}"}<|eot|>' in text
    tokenizer.chat_template = CONCATENATED
    text = render_prompt(tokenizer, rows[0]["prompt"], is_chat=True, apply_chat_template=True)
    assert text == "user:Add 1 and 2|<A><calls>add|tool:3|"


def test_content_null_without_tool_calls_is_still_an_error_row(tmp_path):
    chats = [
        [{"role": "assistant", "content": None}],
        [{"role": "assistant", "content": None, "tool_calls": []}],
        [{"role": "assistant", "content": None, "tool_calls": None}],
        [{"role": "assistant", "tool_calls": "add"}],
        [{"role": "assistant", "content": [_text("a"), {"type": "image_url"}], "tool_calls": [CALL]}],
    ]
    rows = _read(tmp_path, [{"messages": chat} for chat in chats]).table.to_pylist()
    assert [r["error"] for r in rows[:4]] == ["messages[0].content is null"] * 4
    assert rows[4]["error"].startswith("messages[0].content[1] is a part of type 'image_url'")


def test_a_parquet_tool_call_message_with_null_content_is_a_record(tmp_path):
    """A Parquet messages column holds every message's fields: the tool call's content is null, the other
    messages' tool_calls are null (no key)."""
    function = pa.struct([("name", pa.string()), ("arguments", pa.string())])
    call = pa.struct([("id", pa.string()), ("type", pa.string()), ("function", function)])
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call))])
    chat = [
        {"role": "user", "content": "Add 1 and 2", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
    ]
    pq.write_table(pa.table({"messages": pa.array([chat], pa.list_(message))}), tmp_path / "in.parquet")
    (row,) = read_input(
        DataConfig(path=str(tmp_path / "in.parquet"), messages_column="messages")
    ).table.to_pylist()
    assert row["error"] is None
    assert json.loads(row["prompt"]) == [
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
    ]


class _Opaque:
    """An object without a text form of its own: str() names its memory address."""


def test_a_value_without_a_text_form_is_an_error_row_not_its_memory_address(tmp_path, monkeypatch):
    """A message key or a metadata value that is an arbitrary Python object (Python API rows) was stored as
    str(), e.g. "<_Opaque object at 0x7f...>": another prompt text and input fingerprint in every process."""
    from pipeline.data.records import RecordBuilder
    from pipeline.data.values import check_messages

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    prompt, problem = check_messages([{"role": "user", "content": "Hi", "extra": _Opaque()}])
    assert prompt is None
    assert problem == (
        "messages[0].extra holds a _Opaque object, which has no text form (str() gives its memory address); "
        "give it as text"
    )
    builder = RecordBuilder(DataConfig())
    builder.add(0, {"prompt": "Add: 1+2", "tag": _Opaque()}, None, None)
    builder.add(
        1, {"prompt": "Add: 1+2", "tag": {"when": Path("/x")}}, None, None
    )  # a str() of its own: kept
    rows = builder.finish().to_pylist()
    assert rows[0]["metadata"] is None and "column 'tag' holds a _Opaque object" in rows[0]["error"]
    assert rows[1]["error"] is None and json.loads(rows[1]["metadata"]) == {"tag": {"when": "/x"}}
