"""Checkpoints: one folder per step, written atomically, verified before anything is loaded.

Layout of `run_dir/step-00000100/`:
    model.safetensors, optimizer.pt    the ddp engine's weights and optimizer state (rank 0), or
    zero/...                           the deepspeed engine's files, each rank its own shard
    trainer.json          step, tokens seen, scheduler state, world size, engine
    config.yaml           the resolved config of the session that wrote it (compared on resume)
    rank-00000.pt ...     each rank's RNG states and data-loader position (weights_only)
    COMPLETE              manifest: every file's size and sha256, written last

A save goes to `.step-00000100.tmp`: every rank writes its part (the engine's files and its own
rank state), then every rank hashes a share of all the files, rank 0 writes the manifest and
renames the folder into place. So a process killed mid-save leaves the previous checkpoints
untouched and a `.tmp` folder that `latest()` ignores, and nothing counts as saved until every
rank has written. A load checks the manifest (the ranks share the hashing again) before the
caller applies anything; the engine checks its own files against the model.

For tests only: with LSYS_TEST_PAUSE_IN_SAVE=<step>:<path> in the environment, the save of that
step stops once every file is written and before its manifest, creates `path` and waits while
`path` exists, so a test can kill the process at a known point of a save (tests/test_train.py).
"""

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lsys.checksums import file_sha256
from parallel import World, barrier

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
ZERO_DIR = "zero"  # the sub-folder the deepspeed engine's shards go to (its DeepSpeed checkpoint tag)
STEP_DIR = re.compile(r"^step-(\d{8})$")
PAUSE_IN_SAVE = "LSYS_TEST_PAUSE_IN_SAVE"  # the test seam described above


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    trainer: dict
    rank_state: dict | None  # this rank's {"rng": ..., "loader": ...}; None if the rank did not exist
    config: dict | None = None  # the resolved config it was trained with; None for checkpoints from before lsys kept it


class SavesEngineState(Protocol):
    def save(self, folder: Path) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


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


def _pause_if_a_test_asks(step: int) -> None:
    """Hold the save of `step` while the file LSYS_TEST_PAUSE_IN_SAVE names exists (for tests; see the module doc)."""
    setting = os.environ.get(PAUSE_IN_SAVE)
    if setting is None:
        return
    pause_step, marker = setting.split(":", 1)
    if int(pause_step) != step:
        return
    Path(marker).touch()
    while Path(marker).exists():
        time.sleep(0.01)


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
        self, step: int, engine: SavesEngineState, trainer_state: dict, rank_state: dict, config: dict | None = None
    ) -> Path:
        """Write a checkpoint collectively (every rank calls this, with its own `rank_state`); keep the newest `keep`."""
        final = self.run_dir / step_dir_name(step)
        tmp = self.run_dir / f".{final.name}.tmp"
        if self.world.is_main:
            for stale in self.run_dir.glob(".step-*.tmp"):
                shutil.rmtree(stale)  # left by a save that was killed
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(rank_state, tmp / f"rank-{self.world.rank:05d}.pt")
        if self.world.is_main:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            if config is not None:
                OmegaConf.save(OmegaConf.create(config), tmp / "config.yaml")
        barrier()
        _pause_if_a_test_asks(step)
        files = self._hash_shared(tmp)
        if self.world.is_main:
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

    def _hash_shared(self, folder: Path) -> dict[str, dict]:
        """Size and sha256 of every file under `folder` (synced to disk), each rank hashing its share."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        mine = {}
        for path in files[self.world.rank :: self.world.world_size]:
            _fsync(path)
            mine[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        return dict(sorted(self._merge_from_all_ranks(mine).items()))

    def _merge_from_all_ranks(self, part: dict) -> dict:
        """The union of every rank's dict (this one's alone when the checkpointer's world is one process)."""
        if self.world.world_size == 1:
            return part
        parts: list[dict] = [{} for _ in range(self.world.world_size)]
        dist.all_gather_object(parts, part)
        return {key: value for each in parts for key, value in each.items()}

    def load(self, path: Path) -> Checkpoint:
        """Read and verify a checkpoint (every rank calls this); raises CheckpointError, never returns a partial one."""
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
        problems = []
        for name, expected in sorted(manifest["files"].items())[self.world.rank :: self.world.world_size]:
            file = path / name
            if not file.is_file():
                problems.append(f"checkpoint {path} is corrupt: {name} is missing")
            elif file.stat().st_size != expected["bytes"] or file_sha256(file) != expected["sha256"]:
                problems.append(f"checkpoint {path} is corrupt: {name} does not match its checksum")
        problems = sorted(self._merge_from_all_ranks({problem: None for problem in problems}))
        if problems:
            raise CheckpointError(problems[0])
        try:
            trainer = json.loads((path / "trainer.json").read_text())
            rank_file = path / f"rank-{self.world.rank:05d}.pt"
            rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else None
            config_file = path / "config.yaml"
            config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
        except Exception as error:  # any reader failure means the files are not what we wrote
            raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
        return Checkpoint(path=path, trainer=trainer, rank_state=rank_state, config=config)


def config_of(path: Path) -> dict:
    """The resolved config of a checkpoint or export folder: its own config.yaml, else its run directory's."""
    path = Path(path)
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return OmegaConf.to_container(OmegaConf.load(candidate))
    raise CheckpointError(f"no config.yaml in or beside checkpoint {path}: it is not inside an lsys run directory")


def load_model_weights(path: Path, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the weights of a complete checkpoint or an export, checksum-verified and checked against `model_state`."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or missing (no {MANIFEST} manifest)")
    expected = json.loads(manifest_path.read_text())["files"].get("model.safetensors")
    if expected is None:
        raise CheckpointError(
            f"checkpoint {path} holds sharded weights (DeepSpeed ZeRO); turn it into one file first: "
            f"python launch/export.py ckpt={path} out=<folder>"
        )
    weights_file = path / "model.safetensors"
    if not weights_file.is_file() or file_sha256(weights_file) != expected["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors does not match its checksum")
    weights = load_file(weights_file)
    check_fits(path, weights, model_state)
    return weights


def check_fits(path: Path, weights: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless `weights` (read from `path`) have exactly the model's names and shapes."""
    missing = sorted(set(model_state) - set(weights))
    unexpected = sorted(set(weights) - set(model_state))
    wrong_shape = [
        f"{name} {tuple(weights[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in model_state.items()
        if name in weights and weights[name].shape != tensor.shape
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
        raise CheckpointError(f"checkpoint {path} does not match the model config: {details}")
