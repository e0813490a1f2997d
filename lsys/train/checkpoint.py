"""Checkpoints: one folder per step, written atomically, verified before anything is loaded.

Layout of `run_dir/step-00000100/`:
    model.safetensors     model weights (rank 0)
    optimizer.pt          optimizer state (rank 0; loaded with weights_only=True)
    trainer.json          step, tokens seen, scheduler state, world size
    config.yaml           the resolved config of the session that wrote it (compared on resume)
    rank-00000.pt ...     each rank's RNG states and data-loader position (weights_only)
    COMPLETE              manifest: every file's size and sha256, written last

A save goes to `.step-00000100.tmp`, gets its manifest, and is renamed into place, so
a process killed mid-save leaves the previous checkpoints untouched and a `.tmp`
folder that `latest()` ignores. A load checks the manifest, reads everything into
memory and checks the model's keys and shapes before the caller applies any of it.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from parallel import World, barrier

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict
    trainer: dict
    rank_state: dict | None  # this rank's {"rng": ..., "loader": ...}; None if the rank did not exist
    config: dict | None = None  # the resolved config it was trained with; None for checkpoints from before lsys kept it


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders in `run_dir` (those with a manifest), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in `run_dir`, or None; interrupted `.tmp` saves are ignored."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


class Checkpointer:
    def __init__(self, run_dir: Path, world: World, keep: int):
        self.run_dir, self.world, self.keep = Path(run_dir), world, keep

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(
        self, step: int, model_state: dict, optimizer_state: dict, trainer_state: dict, rank_state: dict,
        config: dict | None = None,
    ) -> Path:
        """Write a checkpoint collectively (every rank calls this, with its own `rank_state`); keep the newest `keep`."""
        final = self.run_dir / step_dir_name(step)
        tmp = self.run_dir / f".{final.name}.tmp"
        if self.world.is_main:
            for stale in self.run_dir.glob(".step-*.tmp"):
                shutil.rmtree(stale)  # left by a save that was killed
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rank_state, tmp / f"rank-{self.world.rank:05d}.pt")
        if self.world.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            if config is not None:
                OmegaConf.save(OmegaConf.create(config), tmp / "config.yaml")
        barrier()
        if self.world.is_main:
            files = {}
            for path in sorted(tmp.iterdir()):
                _fsync(path)
                files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
            _fsync(tmp / MANIFEST)
            if final.exists():
                shutil.rmtree(final)  # an older save of this same step, e.g. re-running a finished run
            os.replace(tmp, final)
            _fsync(self.run_dir)
            for old in self.complete_checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        barrier()
        return final

    def load(self, path: Path) -> Checkpoint:
        """Read and verify a checkpoint; raises CheckpointError, never returns a partial one."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not manifest_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST} manifest): its save was interrupted")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"checkpoint {path}: unreadable manifest ({error})") from None
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
            if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
        try:
            trainer = json.loads((path / "trainer.json").read_text())
            model = load_file(path / "model.safetensors")
            optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            rank_file = path / f"rank-{self.world.rank:05d}.pt"
            rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else None
            config_file = path / "config.yaml"
            config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
        except Exception as error:  # any reader failure means the files are not what we wrote
            raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
        return Checkpoint(
            path=path, model=model, optimizer=optimizer, trainer=trainer, rank_state=rank_state, config=config
        )


def load_model_weights(path: Path, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the weights of a complete checkpoint, checksum-verified and checked against `model_state`."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or missing (no {MANIFEST} manifest)")
    expected = json.loads(manifest_path.read_text())["files"]["model.safetensors"]
    weights_file = path / "model.safetensors"
    if not weights_file.is_file() or _sha256(weights_file) != expected["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors does not match its checksum")
    weights = load_file(weights_file)
    check_fits(Checkpoint(path=path, model=weights, optimizer={}, trainer={}, rank_state=None), model_state)
    return weights


def check_fits(checkpoint: Checkpoint, model_state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless the checkpoint's weights have exactly the model's names and shapes."""
    missing = sorted(set(model_state) - set(checkpoint.model))
    unexpected = sorted(set(checkpoint.model) - set(model_state))
    wrong_shape = [
        f"{name} {tuple(checkpoint.model[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in model_state.items()
        if name in checkpoint.model and checkpoint.model[name].shape != tensor.shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape {wrong_shape[:3]}" if wrong_shape else "",
            )
            if part
        )
        raise CheckpointError(f"checkpoint {checkpoint.path} does not match the model config: {details}")
