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
