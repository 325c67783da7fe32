"""The Python API checks prompts as the job checks input rows: a bad one is an error completion naming the
problem, the others generate; a chat prompt gets the id the job would give the same row."""

from __future__ import annotations

import json

import pytest

from pipeline import LLM
from pipeline.config.schema import DataConfig
from pipeline.data.readers import read_input


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin:tiny-diffusiongemma", max_new_tokens=16, max_denoising_steps=2)


def test_bad_prompts_are_error_rows_and_the_good_ones_generate(llm):
    prompts = ["", None, 7, [{"role": "user"}], [], "Add: 1+2", [{"role": "user", "content": "Add: 2+2"}]]
    out = llm.generate(prompts)
    assert [c.finish_reason == "error" for c in out] == [True] * 5 + [False] * 2
    assert [c.error for c in out[:5]] == [
        "prompt is empty",
        "prompt is null",
        "prompt must be a string, got int",
        "messages[0].content is null",
        "messages must be a non-empty list of {role, content} objects",
    ]
    assert all(c.completion == "" and c.completion_tokens == 0 for c in out[:5])
    assert all(c.error is None and c.completion_tokens > 0 for c in out[5:])
    assert len({c.id for c in out}) == len(prompts)
    assert [c.finish_reason for c in llm.generate([None, ""])] == ["error", "error"]


def test_a_chat_prompt_has_the_id_the_job_gives_the_same_input_row(llm, tmp_path):
    """Keys other than role and content are not part of the prompt (the readers drop them), so not of its id."""
    chat = [{"role": "user", "content": "Add: 3+4", "name": "ann"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n")
    job_ids = read_input(DataConfig(path=str(path), messages_column="messages")).table.column("id")
    (completion,) = llm.generate([chat])
    assert completion.error is None and completion.id == job_ids[0].as_py()


@pytest.mark.parametrize("record_drafts", [False, True])
def test_a_postprocess_setting_the_drafts_column_is_that_rows_error(record_drafts):
    """{"drafts": "x"} with record_drafts off was taken as the drafts column and written as [['x']]."""
    llm = LLM(
        "builtin:tiny-diffusiongemma",
        max_new_tokens=16,
        max_denoising_steps=2,
        record_drafts=record_drafts,
        postprocess={"_target_": "tests.runner.postprocess_fns.sets_drafts"},
    )
    (out,) = llm.generate(["Add: 1+2"])
    assert out.finish_reason == "error" and "drafts" not in out.extra
    assert "returned columns the output already has: ['drafts']" in out.error


def test_an_unknown_setting_lists_every_setting_the_api_takes():
    """The list named the sampler's knobs only, not stop, completions_per_prompt, batch_size, system_prompt."""
    with pytest.raises(TypeError) as info:
        LLM("builtin:tiny-diffusiongemma", bogus=1)
    message = str(info.value)
    assert message.startswith("unknown setting(s) ['bogus']; valid ones: ")
    for name in ("stop", "completions_per_prompt", "batch_size", "system_prompt", "max_new_tokens", "mask"):
        assert f" {name}," in message or message.endswith(f" {name}"), name
