"""Parallel test runs (pytest-xdist) with the Ray tests in two lanes, each given a worker of its own first.

The tests marked @pytest.mark.ray start Ray instances sized to the machine and are the longest tests by far;
while a job starts up or waits on Ray they leave the CPU idle. They run in two groups (`--dist loadgroup`):
- "ray": the tests that start Ray inside the test process (the `ray_local` fixture), on worker gw0;
- "ray-jobs": the other Ray tests, which run whole jobs as subprocesses, on worker gw1.
Each lane's tests run one after another; the two lanes run side by side (on 2 cores, one lane's tests summed to the
whole suite's wall time, 753 s of 752 s, with the CPU a third busy). A test that kills Ray workers kills
only those of its own job (tests/runner/test_faults.py), so the lanes cannot hit each other. Every other
module is a group of its own, so its module-scoped fixtures (trained tiny models, ~10 s each) are built once;
the workers that hold no lane (gw2, gw3 on a larger machine) lower their CPU priority, so that everything
else fills the time the lanes leave. On a machine with one worker, everything runs on gw0.
"""

from __future__ import annotations

import os

import pytest
from xdist.scheduler import LoadGroupScheduling

IN_PROCESS_LANE, JOBS_LANE = "ray", "ray-jobs"
LANE_OF_WORKER = {"gw0": IN_PROCESS_LANE, "gw1": JOBS_LANE}


class RayLanesFirstScheduling(LoadGroupScheduling):
    """Each lane goes first to its own worker; no other worker takes a lane while other work is queued."""

    def _assign_work_unit(self, node) -> None:
        queue = self.workqueue
        own = LANE_OF_WORKER.get(node.gateway.id)
        if own not in queue or len(self.nodes) == 1:
            own = None
        lanes = [g for g in (IN_PROCESS_LANE, JOBS_LANE) if g in queue and g != own]
        if len(lanes) < len(queue) - (own is not None):  # other work is queued: lanes of other workers last
            for lane in lanes:
                queue.move_to_end(lane)
        if own is not None:
            queue.move_to_end(own, last=False)
        super()._assign_work_unit(node)


class RayLanesPlugin:
    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getoption("dist") == "loadgroup":
            return RayLanesFirstScheduling(config, log)
        return None


def install(config: pytest.Config) -> None:
    """On the controller: the scheduler; on a worker that holds no lane: the lower priority."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        config.pluginmanager.register(RayLanesPlugin(), "canvasflow-ray-lanes")
    elif worker not in LANE_OF_WORKER and getattr(config.option, "loadgroup", False):
        _lower_priority()


def _lower_priority() -> None:
    """Nice 10, in a session of its own at autogroup nice 19: with autogroups (Linux's default), CPU time is
    shared between sessions first, and each job subprocess runs in a session of its own (start_new_session),
    so the nice value of a process in the test runner's session alone would not yield to it."""
    os.nice(10)
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write("19")
    except OSError:  # a group leader already, or no autogroups: the nice value is what there is
        pass


def group_of(item: pytest.Item) -> str:
    if not item.get_closest_marker("ray"):
        return item.nodeid.split("::", 1)[0]
    return IN_PROCESS_LANE if "ray_local" in getattr(item, "fixturenames", ()) else JOBS_LANE
