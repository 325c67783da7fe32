"""A postprocess callable of the user's own, chosen on the command line as the README shows."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, to_job_config
from tests.config.test_config import _compose


def test_a_callable_of_ones_own_with_keyword_arguments():
    job = to_job_config(
        _compose(
            "postprocess=callable",
            "postprocess._target_=pipeline.tasks.checker.check_row",
            "+postprocess.drop_incorrect=true",
        )
    )
    assert job.postprocess == {"_target_": "pipeline.tasks.checker.check_row", "drop_incorrect": True}


def test_the_callable_group_without_a_target_names_the_key():
    with pytest.raises(ConfigError, match=r"postprocess\._target_"):
        to_job_config(_compose("postprocess=callable"))


def test_the_task_checker_strips_the_completion_and_gives_partial_credit_over_the_longer_text():
    """postprocess=task_checker's columns: is_correct compares the stripped completion exactly, score is the
    share of positions right over the longer of answer and completion (extra characters cost credit)."""
    from pipeline.tasks.checker import check_row

    row = check_row({"prompt": "Add: 1+2", "completion": " 3\n"})
    assert row == {"task": "addition", "expected": "3", "is_correct": True, "score": 1.0}
    assert check_row({"prompt": "Add: 1+2", "completion": "33"})["score"] == 0.5
    assert check_row({"prompt": "Add: 1+2", "completion": "4"}, drop_incorrect=True) is None
