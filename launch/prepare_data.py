"""Tokenize a data source into shards: `python launch/prepare_data.py data=stdlib out=data/stdlib-shards`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.data.prepare import run
from lsys.hydra_app import exit_on_bad_overrides


@hydra.main(config_path="../conf", config_name="prepare_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "prepare_data")
    main()
