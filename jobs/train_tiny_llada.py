"""Train the built-in tiny LLaDA-architecture model (masked diffusion) on the verifiable tasks.

python jobs/train_tiny_llada.py                                   # the shipped model -> pipeline/assets/tiny-llada
python jobs/train_tiny_llada.py train.steps=200 train.out_dir=/tmp/tiny-llada   # a quick run elsewhere
python jobs/train_tiny_llada.py --cfg job                         # print the resolved config, train nothing
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dataclasses import dataclass, field  # noqa: E402

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline.config.store import run_cli  # noqa: E402
from pipeline.training.mask_train import MaskTrainConfig  # noqa: E402


@dataclass
class _Schema:
    train: MaskTrainConfig = field(default_factory=MaskTrainConfig)


ConfigStore.instance().store(name="train_tiny_llada_schema", node=_Schema)
_started = []  # set once Hydra has composed the config and calls main


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tiny_llada")
def main(cfg: DictConfig) -> None:
    _started.append(True)
    import logging

    from pipeline.training.config import exit_on_bad_value
    from pipeline.training.mask_train import train

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    schema: _Schema = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(_Schema), cfg))
    with exit_on_bad_value("jobs/train_tiny_llada.py"):
        train(schema.train)


if __name__ == "__main__":
    # a config that does not compose exits 2, Ctrl-C 130 and SIGTERM 143 with one line each
    run_cli(
        main,
        lambda: bool(_started),
        "jobs/train_tiny_llada.py",
        _Schema,
        interrupted_note="train.out_dir keeps the checkpoint it held (the run writes to <train.out_dir>.partial); rerun to train again",
    )
