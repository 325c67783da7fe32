"""A keyword argument the postprocess callable does not take (a typo such as +postprocess.drop_incorect=true)
fails at start-up naming it. It made every row fail in the postprocess stage after sampling ("raised
TypeError(... unexpected keyword argument ...)"), a run of error rows that exited 0."""

from __future__ import annotations

import pytest

from pipeline.postprocess import PostprocessError, load_postprocess

CHECKER = "pipeline.tasks.checker.check_row"


def test_an_unknown_keyword_argument_fails_naming_it_and_the_parameters():
    with pytest.raises(PostprocessError) as error:
        load_postprocess({"_target_": CHECKER, "drop_incorect": True})
    message = str(error.value)
    assert "postprocess.drop_incorect" in message and CHECKER in message
    assert "drop_incorrect" in message  # what it does take


def test_known_keyword_arguments_load():
    """The kwargs are bound, and the callable's declared column types come back with it (the run's column
    types, e.g. score as double, come from them rather than from the first shard's values)."""
    fn, name, columns = load_postprocess({"_target_": CHECKER, "drop_incorrect": True})
    assert name == CHECKER and fn.keywords == {"drop_incorrect": True}
    assert columns == {"task": "string", "expected": "string", "is_correct": "bool", "score": "double"}


def test_a_callable_taking_any_keyword_argument_loads(tmp_path, monkeypatch):
    (tmp_path / "pp_any_kwargs.py").write_text("def fn(row, **options):\n    return dict(options)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, _, _ = load_postprocess({"_target_": "pp_any_kwargs.fn", "anything": 1})
    assert fn({"id": "a"}) == {"anything": 1}


def test_a_row_as_keyword_argument_is_refused():
    """The row is the first argument; a kwarg of that name would collide with it on every row."""
    with pytest.raises(PostprocessError, match=r"postprocess\.row"):
        load_postprocess({"_target_": CHECKER, "row": 1})


@pytest.mark.parametrize(
    ("module", "source", "problem"),
    [
        ("pp_no_row", "def fn():\n    return {}\n", "too many positional arguments"),
        ("pp_two_args", "def fn(row, ref):\n    return {}\n", "missing a required argument: 'ref'"),
    ],
)
def test_a_callable_that_cannot_take_the_row_fails_without_keyword_arguments(
    tmp_path, monkeypatch, module, source, problem
):
    """Checked only when keyword arguments were given: without any, every row failed in the postprocess stage
    after sampling (TypeError), and the run exited 0 with no output row."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PostprocessError, match=rf"{module}.fn cannot be called with the row: {problem}"):
        load_postprocess({"_target_": f"{module}.fn"})


def test_a_callable_with_optional_parameters_loads_without_keyword_arguments(tmp_path, monkeypatch):
    (tmp_path / "pp_optional.py").write_text(
        "def fn(row, scale=2, *, label='x'):\n    return {label: scale}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, _, _ = load_postprocess({"_target_": "pp_optional.fn"})
    assert fn({"id": "a"}) == {"x": 2}


@pytest.mark.parametrize("target", ["mymod.fn", "mypkg.sub.fn"])
def test_a_module_that_is_not_on_the_path_says_to_run_with_pythonpath_or_install_it(target):
    """ "cannot import 'mymod': No module named 'mymod'" gave no hint of the README's advice."""
    with pytest.raises(PostprocessError) as error:
        load_postprocess({"_target_": target})
    message = str(error.value)
    assert f"cannot import {target.rpartition('.')[0]!r}: No module named" in message
    assert "run the job with PYTHONPATH=. (the workers inherit it), else install its package" in message


def test_a_failing_import_inside_the_module_is_not_taken_for_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "pp_needs_dep.py").write_text("import pp_absent_dependency\n\ndef fn(row):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PostprocessError) as error:
        load_postprocess({"_target_": "pp_needs_dep.fn"})
    message = str(error.value)
    assert "No module named 'pp_absent_dependency'" in message and "install what it imports" in message
    assert "PYTHONPATH" not in message
