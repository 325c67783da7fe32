"""data.prompt_template (a prompt built from a row's columns) and data.system_prompt (a system turn before
every prompt): reading, per-row errors, start-up errors, rendering."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import ConfigError, DataConfig, JobConfig
from pipeline.config.validate import validate_job
from pipeline.data.prompts import (
    PromptTooLong,
    check_system_prompt,
    prompt_ids,
    render_prompt,
    template_fields,
)
from pipeline.data.readers import InputError, read_input

TEMPLATE = "Question: {question}\nContext: {context} ({year}) {{braces}}"


def test_template_fields_are_the_named_columns_in_order():
    assert template_fields(TEMPLATE) == ["question", "context", "year"]
    assert template_fields("{a} and {a} again {b}") == ["a", "b"]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("no field at all", "names no column"),
        ("{} twice", "positional field"),
        ("{0}", "positional field"),
        ("{row.question}", "without attributes, indexes or formats"),
        ("{question[0]}", "without attributes, indexes or formats"),
        ("{score:.2f}", "without attributes, indexes or formats"),
        ("{question!r}", "without attributes, indexes or formats"),
        ("{question", "is not a valid template"),
        ("question}", "is not a valid template"),
    ],
)
def test_a_bad_template_is_refused_at_startup_naming_the_key(template, message):
    job = JobConfig(data=DataConfig(prompt_template=template))
    with pytest.raises(ConfigError, match=rf"data.prompt_template=.* {message}"):
        validate_job(job)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DataConfig(prompt_template="{q}", messages_column="chat"), "set one of them"),
        (DataConfig(system_prompt="  "), "data.system_prompt='  ' is empty"),
        (DataConfig(system_prompt="Be brief.", apply_chat_template=False), "apply_chat_template=false"),
        # chat rows were templated anyway, the key silently ignored
        (
            DataConfig(messages_column="messages", apply_chat_template=False),
            r"data.apply_chat_template=False turns the chat template off, and data.messages_column='messages' "
            "gives chat messages",
        ),
        # the prompts came from the other key, the column silently not read
        (
            DataConfig(prompt_column="question", messages_column="chat"),
            r"^data.prompt_column='question' names a column of plain prompts, and data.messages_column='chat' "
            "gives the prompts instead, so the column would not be read: set one of them",
        ),
        (
            DataConfig(prompt_column="question", prompt_template="Q: {q}"),
            r"^data.prompt_column='question' names a column of plain prompts, and "
            r"data.prompt_template='Q: \{q\}' gives the prompts instead",
        ),
    ],
)
def test_prompt_options_that_cannot_work_together_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_job(JobConfig(data=data))


def test_the_default_prompt_column_goes_with_messages_or_a_template():
    for data in (
        DataConfig(messages_column="chat"),
        DataConfig(prompt_column="prompt", prompt_template="{q}"),
    ):
        validate_job(JobConfig(data=data))


def test_template_rows_fill_strings_and_numbers_and_bad_rows_say_which_column(tmp_path):
    rows = [
        {"question": "What is 2+2?", "context": "arithmetic", "year": 2024, "answer": "4"},
        {"question": "Capital of France?", "context": "", "year": 1.5},  # an empty value is allowed
        {"question": "Q?", "year": 2020},  # no context
        {"question": None, "context": "c", "year": 1},
        {"question": ["a", "list"], "context": "c", "year": 1},
        {"question": "Q", "context": "c", "year": float("nan")},
        {"question": "   ", "context": " ", "year": True},  # renders to a non-empty prompt: fine
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_input(DataConfig(path=str(path), prompt_template=TEMPLATE)).table.to_pylist()
    assert records[0]["prompt"] == "Question: What is 2+2?\nContext: arithmetic (2024) {braces}"
    assert records[1]["prompt"] == "Question: Capital of France?\nContext:  (1.5) {braces}"
    assert records[6]["prompt"] == "Question:    \nContext:   (True) {braces}"
    # the template's columns stay in metadata: the output keeps the clean values beside the rendered prompt
    assert json.loads(records[0]["metadata"]) == {
        "question": "What is 2+2?",
        "context": "arithmetic",
        "year": 2024,
        "answer": "4",
    }
    errors = {r["source_index"]: r["error"] for r in records if r["error"]}
    assert errors == {
        2: "missing column(s) 'context' of data.prompt_template",
        3: "column 'question' is null; data.prompt_template fills strings and numbers",
        4: "column 'question' is a list; data.prompt_template fills strings and numbers",
        5: "column 'year' is nan (not a finite number); data.prompt_template needs a value",
    }


def test_an_input_without_the_template_columns_fails_at_startup(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"question": "q", "ctx": "c"}) + "\n")
    with pytest.raises(
        InputError, match=r"no row .* has every column of data.prompt_template \(question, context"
    ):
        read_input(DataConfig(path=str(path), prompt_template="{question} {context}"))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"question": ["q"], "ctx": ["c"]}), parquet)
    with pytest.raises(InputError, match=r"no column\(s\) 'context' of data.prompt_template"):
        read_input(DataConfig(path=str(parquet), prompt_template="{question} {context}"))


ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "tiny-diffusiongemma"
JOINED = (
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% if not loop.last %}|{% endif %}{% endfor %}"
)


def _tokenizer(chat_template: str):
    """The tiny model's real tokenizer with another chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    tokenizer.chat_template = chat_template
    return tokenizer


def test_the_system_turn_goes_first_unless_a_chat_has_its_own():
    tok = _tokenizer(JOINED)
    render = functools.partial(render_prompt, tok, apply_chat_template=True)
    assert render("hi", is_chat=False, system_prompt="S") == "system:S|user:hi"
    own = json.dumps([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}])
    assert render(own, is_chat=True, system_prompt="S") == "system:mine|user:hi"
    chat = json.dumps([{"role": "user", "content": "hi"}])
    assert render(chat, is_chat=True, system_prompt="S") == "system:S|user:hi"
    assert render("hi", is_chat=False) == "user:hi"


def test_a_templated_prompt_opens_the_models_turn_and_fits_a_limit_of_its_own_length():
    """The model is conditioned on the user turn followed by the opening of its own turn (the generation
    prompt), and a rendered prompt of exactly max_chars characters is tokenized, one more is not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS)
    text = render_prompt(tok, "Add: 1+2", is_chat=False, apply_chat_template=True)
    assert text == "<bos><start_of_turn>user\nAdd: 1+2<end_of_turn>\n<start_of_turn>model\n"
    ids = prompt_ids(tok, "Add: 1+2", is_chat=False, apply_chat_template=True, max_chars=len(text))
    assert tok.decode(ids) == text
    with pytest.raises(PromptTooLong):
        prompt_ids(tok, "Add: 1+2", is_chat=False, apply_chat_template=True, max_chars=len(text) - 1)


def test_a_chat_template_that_refuses_or_drops_system_turns_is_reported():
    refuses = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + JOINED
    )
    drops = "{% for m in messages if m['role'] != 'system' %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
    check_system_prompt(_tokenizer(JOINED), "Be brief.", True)
    with pytest.raises(ValueError, match=r"refuses a system turn \(System role not supported\)"):
        check_system_prompt(_tokenizer(refuses), "Be brief.", True)
    with pytest.raises(ValueError, match="drops system turns"):
        check_system_prompt(_tokenizer(drops), "Be brief.", True)
    check_system_prompt(_tokenizer(drops), None, True)  # nothing to check without a system prompt


def test_a_float32_column_fills_the_template_as_written(tmp_path):
    """Parquet float32 values arrive as float64 (0.1 as 0.10000000149011612): the template writes the float32's
    shortest form; float64 values keep theirs."""
    path = tmp_path / "in.parquet"
    table = pa.table(
        {"price": pa.array([0.1, 2.5], pa.float32()), "exact": pa.array([0.1, 1 / 3], pa.float64())}
    )
    pq.write_table(table, path)
    records = read_input(DataConfig(path=str(path), prompt_template="{price} {exact}")).table.to_pylist()
    assert [r["prompt"] for r in records] == ["0.1 0.1", f"2.5 {1 / 3!r}"]


def test_a_whole_number_fills_the_template_as_the_same_number(tmp_path):
    """A float64 (or JSON) whole number that a float32 holds exactly but writes shorter as another number:
    1099511627776.0 (2**40) went into the prompt as 1.0995116e+12, i.e. 1099511600000."""
    path = tmp_path / "in.jsonl"
    lines = ['{"n": 1099511627776.0}', '{"n": -1099512676352.0}', '{"n": 100000000.0}', '{"n": 1e300}']
    path.write_text("\n".join(lines) + "\n")
    records = read_input(DataConfig(path=str(path), prompt_template="{n}")).table.to_pylist()
    prompts = [r["prompt"] for r in records]
    assert prompts == ["1099511627776.0", "-1099512676352.0", "1e+08", "1e+300"]
    assert [float(p) for p in prompts] == [2.0**40, -(2.0**40 + 2**20), 1e8, 1e300]


def test_a_decimal_column_fills_the_template_as_written(tmp_path):
    """A Parquet decimal column (SQL DECIMAL / NUMERIC exports) made every row an error row, "column 'price' is
    a Decimal; data.prompt_template fills strings and numbers": a decimal is a number."""
    from decimal import Decimal

    path = tmp_path / "in.parquet"
    prices = pa.array([Decimal("1.50"), Decimal("-20.00")], pa.decimal128(6, 2))
    pq.write_table(pa.table({"item": ["tea", "debt"], "price": prices}), path)
    records = read_input(DataConfig(path=str(path), prompt_template="{item} costs {price}")).table.to_pylist()
    assert [(r["prompt"], r["error"]) for r in records] == [
        ("tea costs 1.50", None),
        ("debt costs -20.00", None),
    ]
