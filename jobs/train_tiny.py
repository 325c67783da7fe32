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

from pipeline.training.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tiny")
def main(cfg: DictConfig) -> None:
    from pipeline.training.config import exit_on_bad_value, to_train_config
    from pipeline.training.loop import train

    with exit_on_bad_value("jobs/train_tiny.py"):
        train(to_train_config(cfg))


if __name__ == "__main__":
    main()
