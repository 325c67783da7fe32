"""The Python API checks prompts as the job checks input rows: a bad one is an error completion naming the
problem, the others generate; a chat prompt gets the id the job would give the same row."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

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


def test_calls_from_several_threads_give_each_the_completions_of_a_call_alone(llm):
    """Two threads of generate took each other's sampler slots: KeyError in _admit, or other rows' text."""
    import threading

    prompts, ids = [f"Add: {i}+{i}" for i in range(6)], [f"r{i}" for i in range(6)]
    alone = [(c.completion, c.denoising_steps) for c in llm.generate(prompts, ids=ids)]
    results, failures = [], []

    def call() -> None:
        try:
            results.append([(c.completion, c.denoising_steps) for c in llm.generate(prompts, ids=ids)])
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and results == [alone] * 3


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        ({"prompt": "Add: 1+2"}, TypeError, "got dict: to pass one chat, wrap its messages in a list"),
        (b"Add: 1+2", TypeError, "got bytes: decode them first"),
        (None, TypeError, "prompts must be a string, a chat or a list of them; got NoneType"),
        (5, TypeError, "got int"),
        ([{"role": "user", "content": "Add: 1+2"}], TypeError, r"is one chat: pass generate\(\[messages\]\)"),
    ],
    ids=["dict", "bytes", "none", "int", "unwrapped-chat"],
)
def test_prompts_that_are_no_list_of_prompts_are_refused_naming_their_type(llm, prompts, error, message):
    """A dict generated its keys, bytes one error row per byte, None and 5 a bare 'not iterable'."""
    with pytest.raises(error, match=message):
        llm.generate(prompts)


def test_any_iterable_of_prompts_and_ids_is_taken(llm):
    listed = llm.generate(["Add: 1+2", "Add: 2+3"], ids=["a", 7])
    generated = llm.generate((p for p in ["Add: 1+2", "Add: 2+3"]), ids=iter(["a", 7]))
    assert [c.id for c in generated] == ["a", "7"]
    assert [c.completion for c in generated] == [c.completion for c in listed]


def test_numpy_ids_are_the_integers_and_strings_they_hold(llm):
    """An id column read with pandas or NumPy holds np.int64 values: they were refused ("got int64")."""
    prompts = ["Add: 1+2", "Add: 2+3", "Add: 3+4"]
    plain = llm.generate(prompts, ids=[7, 8, "c"])
    for ids in (np.array([7, 8, 9])[:2].tolist() + [np.str_("c")], [np.int64(7), np.int32(8), np.str_("c")]):
        out = llm.generate(prompts, ids=ids)
        assert [c.id for c in out] == ["7", "8", "c"]
        assert [c.completion for c in out] == [c.completion for c in plain]
    with pytest.raises(ValueError, match=r"ids\[1\]=np.int64\(7\) repeats ids\[0\]"):
        llm.generate(prompts, ids=np.array([7, 7, 9]))
    with pytest.raises(TypeError, match=r"ids\[0\]=np.True_ must be a string or an integer, got bool"):
        llm.generate(prompts, ids=np.array([True, False, True]))


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (["a", "a", "b"], ValueError, r"ids\[1\]='a' repeats ids\[0\]: ids key each row's random numbers"),
        ([None, None, None], TypeError, r"ids\[0\]=None must be a string or an integer, got NoneType"),
        (["a", " ", "c"], ValueError, r"ids\[1\]=' ' is empty"),
        ("abc", TypeError, "ids must be a list of strings or integers, one per prompt; got str"),
        ([True, "b", "c"], TypeError, r"ids\[0\]=True must be a string or an integer, got bool"),
        (["a", "b"], ValueError, "ids has 2 entries for 3 prompts"),
        (
            ["a", "x\ud800", "c"],
            ValueError,
            r"ids\[1\]='x\\ud800' is not valid UTF-8 \(it holds a lone surrogate",
        ),
    ],
    ids=["duplicate", "none", "blank", "string", "bool", "count", "surrogate"],
)
def test_ids_are_checked_as_the_job_checks_an_id_column(llm, ids, error, message):
    """Duplicates shared their random numbers; None became the id 'None'; 'abc' became the ids a, b, c; a lone
    surrogate failed the whole call with a UnicodeEncodeError from the random-number key."""
    with pytest.raises(error, match=message):
        llm.generate(["Add: 1+2", "Add: 2+3", "Add: 3+4"], ids=ids)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dtype": "foo"}, ValueError, "dtype='foo' is not one of auto, float32, bfloat16, float16"),
        ({"device": "gpu"}, ValueError, "device='gpu' is not one of auto, cpu, cuda"),
        ({"batching": "dynamic"}, ValueError, "batching='dynamic' is not one of continuous, static"),
        ({"batch_size": 0}, ValueError, "batch_size=0 must be a positive integer"),
        ({"batch_size": "4"}, ValueError, "batch_size='4' must be a positive integer"),
        (
            {"max_prompt_tokens": -5},
            ValueError,
            r"max_prompt_tokens=-5 must be a positive integer \(or None\)",
        ),
        ({"cuda_graphs": "no"}, TypeError, "cuda_graphs='no' must be True or False"),
        ({"mask": "dual"}, TypeError, "mask='dual' must be a dict of the mask-diffusion settings"),
        ({"adaptive_stopping": "no"}, ValueError, "^adaptive_stopping='no' must be true or false"),
        ({"canvas_length": 0}, ValueError, "^canvas_length=0 must be a positive integer"),
        ({"canvas_length": 2.7}, ValueError, "^canvas_length=2.7 must be a positive integer"),
        (
            {"mask": {"steps": 4}},
            ValueError,
            r"^mask.steps=4 is a mask-diffusion \(LLaDA, Dream\) setting",
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_engine_arguments_are_checked_naming_the_keyword(kwargs, error, message):
    """Each was accepted (a string 'no' as true, canvas_length=0 as the model's, mask ignored on a DiffusionGemma
    model) or failed with an internal error (KeyError 'foo', TypeError from a comparison)."""
    with pytest.raises(error, match=message):
        LLM("builtin:tiny-diffusiongemma", max_new_tokens=16, max_denoising_steps=2, **kwargs)


@pytest.mark.parametrize("given", ["sets_drafts", "its name", "a lambda"])
def test_a_postprocess_that_is_no_dict_is_refused_naming_the_dict_to_give(given):
    """A callable (what a Python user passes first) failed with "'function' object is not iterable", a dotted
    name with "dictionary update sequence element #0 has length 1; 2 is required"."""
    from tests.runner import postprocess_fns

    postprocess = {
        "sets_drafts": postprocess_fns.sets_drafts,
        "its name": "tests.runner.postprocess_fns.sets_drafts",
        "a lambda": lambda row: {},
    }[given]
    with pytest.raises(TypeError) as info:
        LLM("builtin:tiny-diffusiongemma", postprocess=postprocess)
    message = str(info.value)
    assert message.startswith(
        f"postprocess={postprocess!r} must be a dict naming an importable callable, e.g. "
        "postprocess={'_target_': 'mymodule.score'}"
    )
    hint = {
        "sets_drafts": "; give the dict, not the callable itself: "
        "postprocess={'_target_': 'tests.runner.postprocess_fns.sets_drafts'}",
        "its name": " (its other keys are the callable's keyword arguments)",
        "a lambda": "; give the dict, not the callable itself",
    }[given]
    assert message.endswith(hint)


def test_sampler_setting_errors_name_the_keywords_the_api_takes():
    """They named the job's keys (sampler.t_max=...), which the API does not take."""
    with pytest.raises(ValueError) as info:
        LLM("builtin:tiny-diffusiongemma", t_min=0.5, t_max=0.3)
    assert str(info.value).startswith("t_max=0.3 must be greater than t_min=0.5 (the temperature falls")
    with pytest.raises(
        ValueError,
        match=r"^mask\.steps=4 is a mask-diffusion \(LLaDA, Dream\) setting; .* with LLM\(\.\.\.\) keywords \(max_",
    ):
        LLM("builtin:tiny-diffusiongemma", mask={"steps": 4})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 100_000}, "^max_new_tokens=100000 leaves no room for a prompt"),
        ({"max_prompt_tokens": 10**6}, r"^max_prompt_tokens=1000000 plus max_new_tokens=16 .*exceeds"),
        ({"backend": "triton"}, r"^backend=triton needs a CUDA device .*; use backend=auto$"),
        ({"device": "cuda"}, r"^device=cuda but no CUDA device is visible .*; use device=auto$"),
        ({"model": "/no/such/model"}, r"^model='/no/such/model' is not a directory"),
        (  # a path holding the job's key names stays as it is
            {"model": "/tmp/runs/sampler.v2/model.dtype"},
            r"^model='/tmp/runs/sampler\.v2/model\.dtype' is not a directory",
        ),
        (
            {"model": "builtin:tiny-llada", "completions_per_prompt": 2},
            r"identical completions: .* Set mask\.temperature > 0",
        ),
    ],
    ids=["max_new_tokens", "max_prompt_tokens", "backend", "device", "model", "path", "mask-hint"],
)
def test_errors_of_the_model_and_the_sampler_name_the_keywords_the_api_takes(kwargs, message, monkeypatch):
    """Only sampler settings errors were rewritten: the others named model.device, sampler.backend, ...,
    which LLM does not take."""
    if torch.cuda.is_available() and {"backend", "device"} & set(kwargs):
        pytest.skip("a CUDA device is visible: these are the errors of a machine without one")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, the Triton backend runs on a CPU
    kwargs = {"model": "builtin:tiny-diffusiongemma", "max_new_tokens": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        LLM(kwargs.pop("model"), **kwargs)


def test_a_prompt_too_long_is_an_error_naming_the_keywords(llm):
    (out,) = llm.generate(["Add: " + "1" * 2000])
    assert out.finish_reason == "error"
    assert re.fullmatch(
        r"prompt has \d+ tokens, more than fit: max_prompt_tokens=\d+ \(context window "
        r"\d+, max_new_tokens=16\)",
        out.error,
    ), out.error


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        (
            "http://alice:hunter2@127.0.0.1:9",
            r"^endpoint_url holds credentials \(user:password@host\): remove",
        ),
        ("127.0.0.1:9", r"^endpoint_url='127.0.0.1:9' must be an http:// or https:// URL"),
    ],
    ids=["credentials", "no-scheme"],
)
def test_an_endpoint_url_is_checked_as_the_job_checks_it_and_never_echoes_a_password(endpoint, message):
    """LLM(endpoint_url=...) went unchecked: one with user:password@ failed (after a minute of S3 retries) with
    a ModelError echoing the password twice, in canvasflow's '(endpoint ...)' and in botocore's URL."""
    with pytest.raises(ValueError, match=message) as info:
        LLM("s3://bucket/model", endpoint_url=endpoint)
    assert "hunter2" not in str(info.value)


def test_a_builtin_models_rows_name_the_builtin(llm):
    """The model column names what the user asked for (builtin:...), not the directory it was found in."""
    assert llm.generate(["Add: 1+2"])[0].model == "builtin:tiny-diffusiongemma"


def test_the_dtype_keyword_is_the_dtype_the_model_is_loaded_in(llm):
    """LLM(dtype=...) reaches the loader; auto is float32 on a CPU, bfloat16 on a GPU (as model.dtype=auto)."""
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        loaded = LLM("builtin:tiny-diffusiongemma", dtype=name, max_new_tokens=16).generator.loaded
        assert {p.dtype for p in loaded.model.parameters()} == {dtype}, name
    auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert {p.dtype for p in llm.generator.loaded.model.parameters()} == {auto}


def test_the_system_prompt_keyword_reaches_the_prompt(llm):
    """LLM(system_prompt=...) renders a system turn before each prompt: more prompt tokens, same prompt."""
    with_system = LLM("builtin:tiny-diffusiongemma", system_prompt="Answer briefly.", max_new_tokens=16)
    (plain,), (system,) = llm.generate(["Add: 1+2"]), with_system.generate(["Add: 1+2"])
    assert system.prompt_tokens > plain.prompt_tokens


def test_each_completion_rejected_by_the_postprocess_gets_its_own_reason():
    """With several completions of a prompt, one filtered out and one raising each get their own error."""
    llm = LLM(
        "builtin:tiny-diffusiongemma",
        max_new_tokens=16,
        max_denoising_steps=2,
        completions_per_prompt=3,
        postprocess={"_target_": "tests.runner.postprocess_fns.keep_filter_raise"},
    )
    ((kept, filtered, raised),) = llm.generate(["Add: 1+2"])
    assert kept.error is None and kept.finish_reason != "error"
    assert filtered.error.startswith("completion 1: filtered out by"), filtered.error
    assert raised.error.startswith("completion 2: ") and "bad completion" in raised.error, raised.error


def test_the_prompt_budget_is_the_context_window_left_capped_at_4096(llm):
    """max_prompt_tokens_for at its bounds: a window the completion fills exactly leaves no room (refused),
    a requested budget may take all that is left but not one token more, and unset it is capped."""
    from pipeline.generation import MAX_PROMPT_TOKENS_CAP, max_prompt_tokens_for

    settings = llm.settings
    span = max(settings.max_new_tokens, settings.max_canvases * settings.canvas_length)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        max_prompt_tokens_for(None, span, settings)
    assert max_prompt_tokens_for(None, span + 1, settings) == 1
    assert max_prompt_tokens_for(100, span + 100, settings) == 100
    with pytest.raises(ValueError, match="max_prompt_tokens=101 plus .* exceeds"):
        max_prompt_tokens_for(101, span + 100, settings)
    assert max_prompt_tokens_for(None, span + 10 * MAX_PROMPT_TOKENS_CAP, settings) == MAX_PROMPT_TOKENS_CAP


def test_a_model_directory_given_as_a_path_loads_as_its_string_does(llm):
    """LLM(pathlib.Path(dir)), as transformers' from_pretrained takes, failed deep in the loader with
    "AttributeError: 'PosixPath' object has no attribute 'startswith'"."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "tiny-diffusiongemma"
    by_path = LLM(shipped, max_new_tokens=16, max_denoising_steps=2)
    (out,) = by_path.generate(["Add: 1+2"], ids=["r1"])
    (expected,) = LLM(str(shipped), max_new_tokens=16, max_denoising_steps=2).generate(
        ["Add: 1+2"], ids=["r1"]
    )
    assert out.error is None and out.model == "tiny-diffusiongemma"
    assert (out.completion, out.denoising_steps) == (expected.completion, expected.denoising_steps)
    with pytest.raises(
        TypeError, match=r"^model=5 must be a Hugging Face model directory \(a str or a path\)"
    ):
        LLM(5)


def test_a_model_directory_without_config_json_is_refused_naming_it(tmp_path):
    """An error naming the path and the fix; without the check it would end in a FileNotFoundError traceback."""
    with pytest.raises(
        ValueError, match=r"^model='.*' has no config.json; is it a Hugging Face model directory"
    ):
        LLM(str(tmp_path))


def test_a_prompt_of_exactly_max_prompt_tokens_generates(llm):
    """max_prompt_tokens is the most a prompt may have: that many generate, one more is an error row."""
    (out,) = llm.generate(["Add: 1+2"])
    n = out.prompt_tokens
    for budget, ok in ((n, True), (n - 1, False)):
        limited = LLM(
            "builtin:tiny-diffusiongemma", max_prompt_tokens=budget, max_new_tokens=16, max_denoising_steps=2
        )
        (got,) = limited.generate(["Add: 1+2"])
        assert (got.error is None) == ok and (got.prompt_tokens == n if ok else "more than fit" in got.error)


def test_completions_hold_no_special_tokens_text():
    """The random model samples special tokens (<pad>, <mask>, ...) among its own: a completion's text is
    decoded without them, as the job writes it."""
    llm = LLM("builtin:tiny-diffusiongemma-random", max_new_tokens=32, max_denoising_steps=2)
    outs = llm.generate(["Add: 1+2", "Sort: 3 1 2", "hello", "x"])
    special = llm.tokenizer.all_special_tokens
    assert not [(o.completion, t) for o in outs for t in special if t in o.completion]


def test_generate_shows_a_progress_bar_of_the_completions_unless_told_not_to(llm, capsys):
    """A long generate call in a script or notebook said nothing until it returned (vLLM's LLM.generate, which
    users know, shows a tqdm bar)."""
    llm.generate(["Add: 1+2", "Add: 2+2", ""])  # the empty prompt is an error row: not sampled, not counted
    err = capsys.readouterr().err
    assert "generating: 100%" in err and "2/2 [" in err and "tok/s]" in err
    llm.generate(["Add: 1+2"], progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress='yes' must be True or False"):
        llm.generate(["Add: 1+2"], progress="yes")


def test_a_postprocess_exception_naming_a_secret_from_the_environment_is_recorded_without_it(monkeypatch):
    """A callable that reads its API key from the environment itself (not given as a postprocess argument) put
    it into errors/ with its exception: only the values canvasflow handed it were removed."""
    monkeypatch.setenv("SCORER_API_KEY", "CANARY-env-5e1b9")
    llm = LLM(
        "builtin:tiny-diffusiongemma",
        max_denoising_steps=4,
        postprocess={"_target_": "tests.runner.postprocess_fns.reads_its_key_from_the_environment"},
    )
    (out,) = llm.generate(["Add: 1+2"])
    assert out.error == (
        "tests.runner.postprocess_fns.reads_its_key_from_the_environment raised "
        "RuntimeError('401 for https://api.example/v1?key=<redacted>')"
    ), out.error


def test_a_postprocess_exception_keeps_the_paths_under_the_working_directory(monkeypatch, tmp_path):
    """PWD (the shell's working directory) has a secret-like name ("pwd", as in db_pwd): its value was removed
    from every postprocess error as a secret, so a missing file under the directory the job was started in was
    reported as "no references at <redacted>/refs.json"."""
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("DB_PWD", "CANARY-pwd-81c3")
    missing = tmp_path / "refs.json"
    llm = LLM(
        "builtin:tiny-diffusiongemma",
        max_denoising_steps=4,
        postprocess={"_target_": "tests.runner.postprocess_fns.reads_a_file", "path": str(missing)},
    )
    (out,) = llm.generate(["Add: 1+2"])
    assert out.error.endswith(f"raised FileNotFoundError('no references at {missing}')"), out.error
    from pipeline.config.redact import environment_secrets

    assert "CANARY-pwd-81c3" in environment_secrets() and str(tmp_path) not in environment_secrets()
