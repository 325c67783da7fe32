"""Train the built-in tiny DiffusionGemma model on the verifiable tasks and write its checkpoint.

python jobs/train_tiny.py                                  # the shipped model -> pipeline/assets/tiny-diffusiongemma
python jobs/train_tiny.py train.steps=200 train.out_dir=/tmp/tiny   # a quick run elsewhere
python jobs/train_tiny.py --cfg job                        # print the resolved config, train nothing
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config.store import run_cli  # noqa: E402
from pipeline.training.config import TrainJob, register_configs  # noqa: E402

register_configs()
_started = []  # set once Hydra has composed the config and calls main


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tiny")
def main(cfg: DictConfig) -> None:
    _started.append(True)
    from pipeline.training.config import exit_on_bad_value, to_train_config
    from pipeline.training.loop import train

    with exit_on_bad_value("jobs/train_tiny.py"):
        train(to_train_config(cfg))


if __name__ == "__main__":
    # a config that does not compose exits 2, Ctrl-C 130 and SIGTERM 143 with one line each
    run_cli(
        main,
        lambda: bool(_started),
        "jobs/train_tiny.py",
        TrainJob,
        interrupted_note="train.out_dir keeps the checkpoint it held (the run writes to <train.out_dir>.partial); rerun to train again",
    )
