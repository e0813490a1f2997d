"""Checkpointer: atomic layout, pruning, and refusing incomplete, corrupt or mismatched checkpoints."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lsys.config import ConfigError
from lsys.models import ModelConfig, build_model
from lsys.train.checkpoint import Checkpointer, CheckpointError, load_model_weights, rng_state, set_rng_state
from lsys.train.config import OptimConfig
from lsys.train.engine import DDPEngine
from lsys.train.guard import DivergenceGuard
from lsys.train.trainer import Trainer
from parallel import World, init_mesh, shutdown
from tests.conftest import TINY, compose_config

WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
RUN = OmegaConf.create({
    "optim": OmegaConf.structured(OptimConfig(warmup_fraction=0.0)),
    "trainer": {"precision": "fp32"},
})
OPEN_GUARD = DivergenceGuard(spike_factor=None, window=1, max_grad_norm=None, max_weight_growth=None)
SMALL = ModelConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64)


def trained_engine(cfg: ModelConfig = SMALL) -> DDPEngine:
    engine = DDPEngine(build_model(cfg), RUN, world=WORLD, max_steps=10)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    engine.train_step([(tokens[:, :-1], tokens[:, 1:])], OPEN_GUARD)
    return engine


def save_steps(checkpointer: Checkpointer, steps: list[int]) -> DDPEngine:
    engine = trained_engine()
    for step in steps:
        trainer_state = {"step": step, "scheduler": engine.scheduler.state_dict()}
        checkpointer.save(step, engine, trainer_state, {"rng": rng_state(), "loader": {"position": step}})
    return engine


def test_save_load_round_trip_and_pruning(tmp_path: Path):
    checkpointer = Checkpointer(tmp_path, WORLD, keep=2)
    saved = save_steps(checkpointer, [1, 2, 3])
    assert [p.name for p in checkpointer.complete_checkpoints()] == ["step-00000002", "step-00000003"]
    loaded = checkpointer.load(checkpointer.latest())
    assert loaded.trainer["step"] == 3
    assert loaded.rank_state["loader"] == {"position": 3}
    fresh = DDPEngine(build_model(SMALL), RUN, world=WORLD, max_steps=10)
    fresh.load(loaded.path, loaded.trainer["scheduler"])
    for name, tensor in saved.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh.scheduler.last_epoch == saved.scheduler.last_epoch == 1
    assert sorted(p.name for p in (tmp_path / "step-00000003").iterdir()) == [
        "COMPLETE", "model.safetensors", "optimizer.pt", "rank-00000.pt", "trainer.json",
    ]


def test_interrupted_save_is_ignored_and_refused(tmp_path: Path):
    checkpointer = Checkpointer(tmp_path, WORLD, keep=3)
    save_steps(checkpointer, [1, 2])
    # What a save killed before its rename leaves behind, and a folder whose manifest never landed.
    (tmp_path / ".step-00000003.tmp").mkdir()
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "model.safetensors").write_bytes(b"partial")
    assert checkpointer.latest().name == "step-00000002"
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpointer.load(tmp_path / "step-00000004")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_refused(tmp_path: Path, damage: str):
    checkpointer = Checkpointer(tmp_path, WORLD, keep=3)
    save_steps(checkpointer, [5])
    target = tmp_path / "step-00000005" / "optimizer.pt"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpointer.load(tmp_path / "step-00000005")


def test_manifest_lists_checksums(tmp_path: Path):
    checkpointer = Checkpointer(tmp_path, WORLD, keep=1)
    save_steps(checkpointer, [7])
    manifest = json.loads((tmp_path / "step-00000007" / "COMPLETE").read_text())
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rank-00000.pt", "trainer.json"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


@pytest.fixture
def one_process_mesh():
    mesh = init_mesh(WORLD)
    yield mesh
    shutdown()


def test_mismatched_model_is_refused_before_loading(corpus: Path, tmp_path: Path, one_process_mesh):
    """Trainer.restore, as a resume calls it, refuses another model's checkpoint and leaves every state as it was."""

    def trainer(run: str, *overrides: str) -> Trainer:
        cfg = compose_config(["data=files", f"data.path={corpus}", *TINY, f"run_dir={tmp_path / run}", *overrides])
        return Trainer(cfg, WORLD, one_process_mesh)

    narrower = trainer("narrower", "model.d_model=32")  # TINY's is 64
    narrower.save()
    resumed = trainer("run")
    resumed.engine.train_step([next(iter(resumed.train_loader))], OPEN_GUARD)  # optimizer state to keep intact

    def everything_restore_sets() -> dict:
        return {
            "model": {name: tensor.clone() for name, tensor in resumed.model.state_dict().items()},
            "optimizer": copy.deepcopy(resumed.engine.optimizer.state_dict()),
            "scheduler": copy.deepcopy(resumed.engine.scheduler.state_dict()),
            "loader": resumed.train_loader.state_dict(),
            "rng": torch.get_rng_state(),
            "step": (resumed.step, resumed.tokens_seen, resumed.resumed_from),
        }

    before = everything_restore_sets()
    assert before["optimizer"]["state"], "the optimizer has state to compare"
    checkpoint = resumed.checkpointer.load(tmp_path / "narrower" / "step-00000000")
    with pytest.raises(ConfigError, match=r"model.d_model: 32 -> 64"):
        resumed.restore(checkpoint)
    assert_same_states(everything_restore_sets(), before)
    # A checkpoint from before lsys recorded configs is compared by its weights' shapes alone.
    with pytest.raises(CheckpointError, match=r"does not match the model config: shape \['embed.weight \(320, 32\) vs"):
        resumed.restore(replace(checkpoint, config=None))
    assert_same_states(everything_restore_sets(), before)
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_model_weights(checkpoint.path, resumed.model.state_dict())  # the init_from / export path


def assert_same_states(after, before, where: str = "state") -> None:
    """Bit for bit: every tensor equal and every other value equal, through dicts, lists and tuples."""
    if isinstance(before, torch.Tensor):
        assert torch.equal(after, before), where
    elif isinstance(before, dict):
        assert after.keys() == before.keys(), where
        for key in before:
            assert_same_states(after[key], before[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(after) == len(before), where
        for index, (a, b) in enumerate(zip(after, before)):
            assert_same_states(a, b, f"{where}[{index}]")
    else:
        assert after == before, where


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
