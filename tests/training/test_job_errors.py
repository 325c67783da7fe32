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


def _job(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("script", "override", "said"),
    [
        ("jobs/eval_quality.py", "eval.rows_per_tsk=4", "eval.rows_per_tsk is not a configuration key"),
        ("jobs/train_tiny.py", "train.stepz=3", "train.stepz is not a configuration key"),
        ("jobs/train_tiny_llada.py", "train.stepz=3", "train.stepz is not a configuration key"),
        ("jobs/train_tiny.py", "train.steps=abc", "train.steps got a value of the wrong type"),
        (
            "jobs/train_tiny.py",
            "train.text_overrides.num_hidden_layers=2",
            "train.text_overrides.num_hidden_layers is a new key under train.text_overrides, whose keys are "
            "free-form: add it with a '+', +train.text_overrides.num_hidden_layers=...",
        ),
    ],
)
def test_a_config_that_does_not_compose_exits_2_saying_how_to_fix_it(tmp_path, script, override, said):
    """These jobs ended with Hydra's own report and exit code 1, where jobs/generate.py exits 2 and says how."""
    key = "eval" if "eval" in script else "train"
    proc = _job(script, override, f"{key}.out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    assert f"could not start (exit code 2): the configuration did not compose. {said}" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["jobs/eval_quality.py", "jobs/train_tiny.py", "jobs/train_tiny_llada.py"])
def test_help_lists_only_what_the_job_can_set(script):
    """--help listed generate.py's config groups (cluster, data, model, ...), which these jobs cannot use."""
    proc = _job(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Configuration groups" not in proc.stdout and "postprocess:" not in proc.stdout
    key = "eval" if "eval" in script else "train"
    assert f"python {script} [{key}.key=value ...]" in proc.stdout
    assert f"\n{key}:\n  " in proc.stdout  # the config with its keys


def test_eval_of_a_mask_diffusion_model_says_it_evaluates_diffusiongemma_models_only(tmp_path):
    """eval.model=builtin:tiny-llada failed on "sampler.canvas_length=0 must be a positive integer", a key the
    user never set."""
    out = tmp_path / "out"
    proc = _job("jobs/eval_quality.py", "eval.model=builtin:tiny-llada", f"eval.out_dir={out}")
    assert proc.returncode == 2, proc.stderr
    assert "eval.model='builtin:tiny-llada' is a llada model (mask diffusion)" in proc.stderr
    assert "evaluates DiffusionGemma models only" in proc.stderr
    assert "canvas_length" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
