"""Generate a synthetic dataset: prompts in, Parquet out.

python jobs/generate.py                                   # shipped prompts, tiny model, ./outputs
python jobs/generate.py data.path=my.jsonl run.id=r1      # your prompts
python jobs/generate.py --cfg job                         # print the resolved config, load nothing
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.config.store import run_cli  # noqa: E402

register_configs()
_started = []  # set once Hydra has composed the config and calls main


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    _started.append(True)
    from pipeline.runner.job import run_from_hydra

    code = run_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_cli(main, lambda: bool(_started), "jobs/generate.py")  # a config that does not compose exits 2
