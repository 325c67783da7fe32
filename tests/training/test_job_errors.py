"""A bad value given to the training and evaluation jobs: one line naming it, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "override", "named"),
    [
        ("jobs/train_tiny.py", "train.steps=0", "train.steps=0"),
        ("jobs/train_tiny_llada.py", "train.block_length=3", "train.block_length=3"),
        ("jobs/eval_quality.py", "eval.rows_per_task=0", "eval.rows_per_task=0"),
        ("jobs/eval_quality.py", "eval.grid=[{},{}]", "'default', 'default'"),
        ("jobs/eval_quality.py", "eval.grid=[{max_denoising_steps: -3}]", "max_denoising_steps=-3"),
    ],
)
def test_a_bad_value_exits_2_naming_it(tmp_path, script, override, named):
    out = tmp_path / "out"
    key = "eval" if "eval" in script else "train"
    proc = subprocess.run(
        [sys.executable, script, override, f"{key}.out_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
