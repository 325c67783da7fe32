"""Jobs on a local Ray instance whose metrics agent exports in Prometheus format, then a scrape of it: for
tests/runner/test_metrics.py, in a process of its own (the other job tests share one Ray instance, started
without an export port or short report intervals).

`python -m tests.support.metrics_run WORKDIR` starts the instance, runs the jobs pickled in WORKDIR/jobs.pkl
(JobConfigs) one after the other through pipeline.runner.job.run (which finds Ray started, as in the tests that
use the ray_local fixture), then scrapes http://127.0.0.1:PORT/metrics until every run's commits are there and
the canvasflow metrics no longer change (or DEADLINE_S passes), and writes WORKDIR/result.json: each run's exit
code and the last scrape.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

REPORT_INTERVAL_MS = 500  # how often processes send their metrics to the agent (Ray's default: 10 s)
DEADLINE_S = 90.0
# Every run's commits are there and nothing changed over this many scrapes, a report interval apart: an export
# taken while the board recorded a commit can hold some of its metrics only (the next one has them all).
STABLE_SCRAPES = 3
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a scrape in Prometheus' text format: (name, labels, value)."""
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            found.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return found


def total(text: str, name: str, **labels: str) -> float:
    """The sum of metric `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for sample, tags, value in samples(text)
        if sample == name and all(tags.get(k) == v for k, v in labels.items())
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return answer.read().decode()
    except OSError:  # not listening yet
        return ""


def main(workdir: Path) -> None:
    import ray

    from pipeline.runner.job import run

    jobs = pickle.loads((workdir / "jobs.pkl").read_bytes())
    port = _free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": REPORT_INTERVAL_MS},
    )
    try:
        codes = {job.run.id: run(job) for job in jobs}
        expected = {}
        for job in jobs:
            stats = json.loads((Path(job.output.uri) / job.run.id / "stats.json").read_text())
            expected[job.run.id] = stats["shards"]["committed_this_invocation"]
        deadline = time.monotonic() + DEADLINE_S
        text, last, stable = "", None, 0
        while time.monotonic() < deadline and stable < STABLE_SCRAPES:
            time.sleep(REPORT_INTERVAL_MS / 1000)
            text = _scrape(port)
            ours = sorted(line for line in text.splitlines() if line.startswith("ray_canvasflow_"))
            committed = all(
                total(text, "ray_canvasflow_shards_committed_total", run_id=run_id) == shards
                for run_id, shards in expected.items()
            )
            stable = stable + 1 if committed and ours == last else 0
            last = ours
    finally:
        ray.shutdown()
    (workdir / "result.json").write_text(json.dumps({"codes": codes, "port": port, "metrics": text}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
