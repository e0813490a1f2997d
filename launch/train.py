"""Train an lsys model: `torchrun --nproc_per_node=2 launch/train.py model=rat_tiny` (or plain `python`)."""

import sys

import hydra
from omegaconf import DictConfig

from lsys.train.trainer import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
