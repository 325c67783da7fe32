"""data.prompt_template and data.system_prompt through the real job (local Ray workers) and the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import LLM
from pipeline.data.prompts import prompt_ids
from pipeline.runner.job import run
from tests.runner.test_job import NEW_TOKENS, STEPS, make_job, read_parts

pytestmark = pytest.mark.ray

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "tiny-diffusiongemma"


def test_a_templated_prompt_with_a_system_turn_is_what_the_model_is_conditioned_on(tmp_path, ray_local):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"{i}+{2 * i}", "answer": str(3 * i)} for i in range(5)] + [
        {"answer": "no question"}
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job = make_job(
        tmp_path, str(path), data__prompt_template="Add: {question}", data__system_prompt="Digits."
    )
    assert run(job) == 0
    run_dir = tmp_path / "out" / "test-run"
    out = sorted(read_parts(run_dir).to_pylist(), key=lambda r: r["source_index"])
    assert [r["prompt"] for r in out] == [f"Add: {i}+{2 * i}" for i in range(5)]
    assert [json.loads(r["metadata"]) for r in out] == rows[:5]  # the template's columns are kept

    llm = LLM(
        "builtin:tiny-diffusiongemma-random",
        system_prompt="Digits.",
        max_denoising_steps=STEPS,
        max_new_tokens=NEW_TOKENS,
    )
    with_system = prompt_ids(
        llm.tokenizer, out[0]["prompt"], is_chat=False, apply_chat_template=True, system_prompt="Digits."
    )
    without = prompt_ids(llm.tokenizer, out[0]["prompt"], is_chat=False, apply_chat_template=True)
    assert out[0]["prompt_tokens"] == len(with_system) > len(without)
    assert llm.generate([out[0]["prompt"]], ids=[out[0]["id"]])[0].completion == out[0]["completion"]
    (error,) = read_parts(run_dir, "errors").to_pylist()
    assert error["reason"] == "missing column(s) 'question' of data.prompt_template"


def test_a_model_whose_chat_template_drops_system_turns_refuses_a_system_prompt(tmp_path, caplog):
    """In the API as the model loads; in the job at start-up, before Ray or any input is read (exit 2)."""
    model = tmp_path / "model"
    shutil.copytree(ASSETS, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages if m['role'] != 'system' %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    LLM(str(model))  # fine without a system prompt
    # The API names its own keyword and a fix it has (it has no data.prompt_template).
    with pytest.raises(ValueError) as info:
        LLM(str(model), system_prompt="Digits.")
    assert str(info.value) == (
        "system_prompt: this model's chat template drops system turns (the rendered prompt does not hold it); "
        "leave system_prompt unset and put the instructions in each prompt, or give chats with their own "
        "system message"
    )
    with pytest.raises(
        ValueError, match=r"system_prompt is a system turn .* templating is off \(apply_chat_template=False\)"
    ):
        LLM(str(model), system_prompt="Digits.", apply_chat_template=False)
    message = "data.system_prompt: this model's chat template drops system turns"
    job = make_job(tmp_path, str(tmp_path / "absent.jsonl"), model__path=str(model), data__system_prompt="D.")
    with caplog.at_level("INFO", logger="canvasflow"):
        assert run(job) == 2
    assert message in caplog.text and "reading input" not in caplog.text


def test_the_api_refuses_a_blank_system_prompt_before_loading_the_model():
    with pytest.raises(ValueError, match="system_prompt='  ' must be a non-empty string"):
        LLM("builtin:tiny-diffusiongemma-random", system_prompt="  ")
