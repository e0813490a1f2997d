"""Any checkpoint (DDP, or DeepSpeed ZeRO 0-3 shards) as one `model.safetensors` and its config.

The export folder holds `model.safetensors` (fp32), `config.yaml` (the resolved config the
checkpoint was trained with) and a `COMPLETE` manifest, so `launch/generate.py` and
`launch/eval_needle.py` load it in one process like a checkpoint (`ckpt=<folder>`).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lsys.checksums import file_sha256
from lsys.train.checkpoint import (
    MANIFEST, ZERO_DIR, Checkpointer, CheckpointError, config_of, latest_checkpoint,
)
from parallel import World

def consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a verified checkpoint, gathered from ZeRO shards when there are any."""
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    if (checkpoint / ZERO_DIR).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ZERO_DIR)
        return {name: tensor.contiguous() for name, tensor in weights.items()}
    raise CheckpointError(f"checkpoint {checkpoint} holds neither model.safetensors nor {ZERO_DIR}/ shards")


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write `out/` (model.safetensors, config.yaml, COMPLETE) from the complete checkpoint folder `checkpoint`."""
    checkpoint, out = Path(checkpoint), Path(out)
    lone = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    Checkpointer(checkpoint.parent, lone, keep=1).load(checkpoint)  # refuses an incomplete or corrupt one
    config = config_of(checkpoint)
    weights = consolidated_weights(checkpoint)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({name: tensor.float() for name, tensor in weights.items()}, tmp / "model.safetensors")
    OmegaConf.save(OmegaConf.create(config), tmp / "config.yaml")
    step = json.loads((checkpoint / "trainer.json").read_text())["step"]
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
             for name in ("model.safetensors", "config.yaml")}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "exported_from": str(checkpoint), "files": files}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run(cfg) -> int:
    """launch/export.py: export `cfg.ckpt` to `cfg.out`; returns the exit code (2: not a complete checkpoint)."""
    checkpoint = Path(cfg.ckpt)
    if checkpoint.is_dir() and not (checkpoint / MANIFEST).is_file() and not checkpoint.name.startswith("step-"):
        checkpoint = latest_checkpoint(checkpoint) or checkpoint  # a run directory: its newest checkpoint
    try:
        out = export_checkpoint(checkpoint, Path(cfg.out))
    except CheckpointError as error:
        print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} to {out}")
    return 0
