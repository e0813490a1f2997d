"""Print a model's parameter count, FLOPs per token and cache size: `python launch/model_info.py model=rat_1b`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.config import model_config
from lsys.hydra_app import exit_on_bad_overrides
from lsys.models.summary import describe_model


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(describe_model(model_config(cfg), seq_len=cfg.data.seq_len))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "config")
    main()
