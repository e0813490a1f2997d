"""One safetensors file from any checkpoint: `python launch/export.py ckpt=runs/NAME/step-00001000 out=exports/NAME`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.hydra_app import exit_on_bad_overrides
from lsys.train.export import run


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "export")
    main()
