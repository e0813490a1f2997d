"""Sample from a trained model: `python launch/generate.py ckpt=runs/NAME 'prompts=["def "]'`."""

import sys

import hydra
from omegaconf import DictConfig

from lsys.generate import run


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
