"""Needle retrieval of a trained model: `python launch/eval_needle.py ckpt=runs/NAME eval.lengths=[256,512]`."""

import sys

import hydra
from omegaconf import DictConfig

from lsys.eval.cli import run


@hydra.main(config_path="../conf", config_name="eval_needle", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
