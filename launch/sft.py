"""Fine-tune an lsys model on chat or prompt/response data (loss on the answers only), from pretrained weights:
    torchrun --nproc_per_node=2 launch/sft.py data=sft data.path=chats.jsonl init_from=runs/NAME

The same trainer as launch/train.py, composed from conf/sft.yaml (the training config with the fine-tuning
optimizer, conf/optim/sft.yaml); every setting of launch/train.py applies. The data must be SFT examples.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lsys.hydra_app import exit_on_bad_overrides
from lsys.train.trainer import run


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.data.get("format", "text") == "text":
        if os.environ.get("RANK", "0") == "0":
            print(f"lsys: config error: launch/sft.py fine-tunes on SFT examples, and data '{cfg.data.name}' is text; "
                  "pass data=sft data.path=FILE (chat or prompt/response records) or data=qa, or pretrain with "
                  "launch/train.py", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides(Path(__file__).resolve().parents[1] / "conf", "sft")
    main()
