"""Parallel test runs (pytest-xdist) with the Ray tests on one worker, given the CPU first.

The tests marked @pytest.mark.ray start local Ray instances sized to the machine: they run one after another,
as the group "ray" (`--dist loadgroup`). They are also the longest group by far, and while a job starts up or
waits on Ray they leave the CPU idle. So the group goes to worker gw0 before anything else, and the other
workers lower their CPU priority: the Ray tests run about as fast as alone, and everything else fills the time
they leave. (Two Ray lanes side by side gained nothing on 2 cores: 748 s against 752 s for the whole suite,
each lane's tests 40-45% slower beside the other. The fault tests kill only their own job's workers, so a
machine with more cores could run them as a lane of their own.) Every other module
is a group of its own, so its module-scoped fixtures (trained tiny models, ~10 s each) are built once.
"""

from __future__ import annotations

import os

import pytest
from xdist.scheduler import LoadGroupScheduling

RAY_GROUP = "ray"
RAY_WORKER = "gw0"


class RayFirstScheduling(LoadGroupScheduling):
    def _assign_work_unit(self, node) -> None:
        if RAY_GROUP in self.workqueue and len(self.workqueue) > 1:
            ray_first = node.gateway.id == RAY_WORKER
            self.workqueue.move_to_end(RAY_GROUP, last=not ray_first)
        super()._assign_work_unit(node)


class RayFirstPlugin:
    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getoption("dist") == "loadgroup":
            return RayFirstScheduling(config, log)
        return None


def install(config: pytest.Config) -> None:
    """On the controller: the scheduler; on a worker other than gw0: the lower priority."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        config.pluginmanager.register(RayFirstPlugin(), "canvasflow-ray-first")
    elif worker != RAY_WORKER and getattr(config.option, "loadgroup", False):
        _lower_priority()


def _lower_priority() -> None:
    """Nice 10, in a session of its own at autogroup nice 19: with autogroups (Linux's default), CPU time is
    shared between sessions first, and each Ray test's job runs in a session of its own (start_new_session),
    so the nice value of a process in the test runner's session alone would not yield to it."""
    os.nice(10)
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write("19")
    except OSError:  # a group leader already, or no autogroups: the nice value is what there is
        pass


def group_of(item: pytest.Item) -> str:
    return RAY_GROUP if item.get_closest_marker("ray") else item.nodeid.split("::", 1)[0]
