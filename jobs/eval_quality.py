"""Exact-match accuracy per task against decoder forward passes per row, over a grid of sampler settings.

python jobs/eval_quality.py                                # shipped model, default grid -> outputs/eval_quality
python jobs/eval_quality.py eval.rows_per_task=200 eval.ablate_all=true
python jobs/eval_quality.py eval.model=/path/to/checkpoint 'eval.grid=[{},{max_denoising_steps: 8}]'

Writes quality.csv, quality.md, quality.png and samples.jsonl (the rows of the first grid point) to eval.out_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config.store import run_cli  # noqa: E402
from pipeline.training.config import EvalJob, register_configs  # noqa: E402

register_configs()
_started = []  # set once Hydra has composed the config and calls main


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval_quality")
def main(cfg: DictConfig) -> None:
    _started.append(True)
    from pipeline.training.config import exit_on_bad_value, to_eval_config
    from pipeline.training.quality import run_eval

    with exit_on_bad_value("jobs/eval_quality.py"):
        print(run_eval(to_eval_config(cfg)))


if __name__ == "__main__":
    # a config that does not compose exits 2, Ctrl-C 130 and SIGTERM 143 with one line each
    run_cli(
        main,
        lambda: bool(_started),
        "jobs/eval_quality.py",
        EvalJob,
        interrupted_note="no new results were written (they are written once every grid point ran); rerun to evaluate again",
    )
