"""A nightly generation run: run id from the scheduled date, LATEST after success, optional retention.

LATEST is <output.uri>/LATEST for the default nightly.run_prefix (nightly), <output.uri>/LATEST-<run_prefix>
for any other, so that several prefixes can share one output.uri.

    python jobs/nightly.py output.uri=s3://bucket/nightly output=s3 nightly.timezone=Europe/Paris
    python jobs/nightly.py nightly.date=2026-11-26        # retry or backfill a given night

Exit codes: 0 complete, 1 shards failed or LATEST could not be written (rerun the night), 2 could not start,
3 refused (overlap or late), 130 interrupted (Ctrl-C), 143 stopped (SIGTERM).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.config.store import run_cli  # noqa: E402
from pipeline.runner.nightly import resume_note  # noqa: E402

register_configs()
_started = []  # set once Hydra has composed the config and calls main


@hydra.main(version_base="1.3", config_path="../conf", config_name="nightly")
def main(cfg: DictConfig) -> None:
    _started.append(True)
    from pipeline.runner.job import nightly_from_hydra

    code = nightly_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # A config that does not compose exits 2; Ctrl-C or SIGTERM names the night to rerun.
    run_cli(main, lambda: bool(_started), "jobs/nightly.py", interrupted_note=resume_note)
