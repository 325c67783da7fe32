"""A local Ray instance shared by the job tests (starting one per test would dominate their run time)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # The workers inherit OMP_NUM_THREADS and TOKENIZERS_PARALLELISM from tests/conftest.py's environment (a
        # runtime_env would keep Ray's prestarted workers from hosting actors: pipeline/runner/ray_setup.py).
        assert os.environ["OMP_NUM_THREADS"] and os.environ["TOKENIZERS_PARALLELISM"]
        # address="local": a new instance even where `ray start` left a cluster running on this machine (ray.init
        # would join it, and refuse num_cpus).
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
