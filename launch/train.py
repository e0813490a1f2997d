"""Train an lsys model: `torchrun --nproc_per_node=2 launch/train.py model=rat_tiny` (or plain `python`)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.hydra_app import exit_on_bad_overrides
from lsys.train.trainer import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "config")
    main()
