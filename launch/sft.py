"""Fine-tune an lsys model on chat or prompt/response data (loss on the answers only), from pretrained weights:
    torchrun --nproc_per_node=2 launch/sft.py init_from=runs/NAME data.path=chats.jsonl

The same trainer as launch/train.py, composed from conf/sft.yaml (the training config with `data=sft` and a
fine-tuning schedule); every setting of launch/train.py applies.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.hydra_app import exit_on_bad_overrides
from lsys.train.trainer import run


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "sft")
    main()
