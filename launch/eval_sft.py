"""Held-out SFT scores of a checkpoint: `python launch/eval_sft.py ckpt=runs/NAME data=qa` (conf/eval_sft.yaml)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.eval.sft_cli import run
from lsys.hydra_app import exit_on_bad_overrides


@hydra.main(config_path="../conf", config_name="eval_sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "eval_sft")
    main()
