"""Writing a trained checkpoint so that its directory holds a whole checkpoint or none.

The training jobs write into `<out_dir>.partial` and only a finished checkpoint replaces `out_dir`: a run
stopped part way (Ctrl-C, a crash, the time budget of a CI job) leaves the earlier checkpoint as it was, and
the next run removes the leftover staging directory. `out_dir` is replaced whole, so it may only be an
earlier checkpoint of these jobs (it has training_log.json), an empty directory or a new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config.schema import ConfigError

TRAINING_LOG = "training_log.json"


def stage_checkpoint(out_dir: str) -> tuple[Path, Path]:
    """Checks `out_dir` (ConfigError naming it when the checkpoint may not replace it) and returns it resolved
    with a new, empty staging directory beside it."""
    out = Path(out_dir).resolve()
    if out.exists() and not (out.is_dir() and ((out / TRAINING_LOG).is_file() or not any(out.iterdir()))):
        raise ConfigError(
            f"train.out_dir={out_dir!r} exists and is not a checkpoint of this job (no {TRAINING_LOG}); the "
            "run would replace it: give a new or empty directory"
        )
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return out, staging


def publish_checkpoint(staging: Path, out: Path) -> None:
    """Makes the finished checkpoint in `staging` the one at `out`."""
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the checkpoint is a package asset others read
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
