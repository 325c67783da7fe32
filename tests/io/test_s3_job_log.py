"""botocore logs 'Found credentials in environment variables.' at INFO on every S3 command, and the jobs log at
INFO to stdout: the line landed in every job's log. It is quieted (WARNING) where the jobs set up logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.s3
@pytest.mark.parametrize("script", ["generate.py", "nightly.py"])
def test_an_s3_job_log_has_canvasflow_lines_but_not_botocores_credential_line(s3_bucket, tmp_path, script):
    s3_bucket.put("in/p.jsonl", (json.dumps({"prompt": "Add: 1+2"}) + "\n").encode())
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / script),
            f"data.path={s3_bucket.uri}/in/p.jsonl",
            f"output.uri={s3_bucket.uri}/out",
            f"output.endpoint_url={s3_bucket.endpoint}",
            "run.dry_run=true",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "dry run" in log.lower()  # canvasflow's own INFO lines are kept
    assert "Found credentials" not in log
