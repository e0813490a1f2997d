"""Memory per rank before renting GPUs: `python launch/plan.py model=rat_1b data.seq_len=131072 parallel.sp=8 ...`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.hydra_app import exit_on_bad_overrides
from lsys.train.plan_command import run


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "plan")
    main()
