"""Engines run forward, backward and the optimizer step: DDP here, DeepSpeed ZeRO in deepspeed_engine.py.

An engine is built from the model and the run's config. It wraps the model, then builds the
optimizer and schedule (after wrapping: ZeRO owns its optimizer), and exposes
    train_step(micro_batches, guard) -> StepResult     evaluate(batches) -> float     weight_norm()
    save(folder) and load(folder, scheduler_state)     (every rank calls them, for checkpoints)
    full_weights()     a context in which `model` holds every weight (evaluation outside the engine)
    model, autocast, optimizer, scheduler
"""

import importlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lsys.data.config import DataConfig
from lsys.data.packing import Batch
from lsys.data.sft import IGNORE_INDEX
from lsys.train.checkpoint import CheckpointError, check_fits
from lsys.train.guard import DivergenceError, DivergenceGuard
from lsys.train.optim import build_optimizer, build_scheduler
from parallel import World

# parallel.engine -> the module and class that implement it (DeepSpeed is imported only when chosen).
ENGINES = {"ddp": ("lsys.train.engine", "DDPEngine"), "deepspeed": ("lsys.train.deepspeed_engine", "DeepSpeedEngine")}


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    weight_norm: float  # of all weights after the update


def build_engine(model: nn.Module, cfg: DictConfig, *, world: World, max_steps: int):
    """The engine `cfg.parallel.engine` names, around `model`."""
    module, name = ENGINES[cfg.parallel.engine]
    return getattr(importlib.import_module(module), name)(model, cfg, world=world, max_steps=max_steps)


def global_sum(value: Tensor) -> Tensor:
    """Sum of a tensor over all ranks (itself in a lone process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def counted_targets(micro_batches: Iterable[Batch], device: torch.device) -> Tensor:
    """How many targets carry loss (are not IGNORE_INDEX) in these micro-batches on every rank together.

    The step's loss is the sum over all of them divided by this count, so each token weighs the same
    whichever micro-batch, dp rank or sequence piece it lands in. At least 1: a step whose targets
    all carry no loss has loss and gradients 0.
    """
    local = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in micro_batches)
    return global_sum(torch.tensor(local, dtype=torch.long, device=device)).clamp(min=1)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 for precision bf16, or auto on GPU; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast when `uses_bf16`, else none."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, precision) else nullcontext()


def restarts_positions(cfg: DictConfig) -> bool:
    """Whether RoPE positions restart at document starts in packed windows (data.rope_restart, resolved)."""
    return DataConfig.from_attrs(cfg.data).restarts_positions if "data" in cfg else True


def summed_loss(
    model: nn.Module, batch: Batch, device: torch.device, autocast, restart_positions: bool = True
) -> Tensor:
    """The summed next-token cross-entropy of one micro-batch over its targets that carry loss.

    A batch is (inputs, targets), or (inputs, targets, segment_ids) when its windows' documents are kept apart.
    """
    inputs, targets, *segments = (t.to(device, non_blocking=True) for t in batch)
    extra = dict(segment_ids=segments[0], restart_positions=restart_positions) if segments else {}
    with autocast:
        return model(inputs, targets=targets, reduction="sum", **extra)


@torch.no_grad()
def mean_loss(loss_of: Callable[[Batch], Tensor], batches: Iterable[Batch], device: torch.device) -> float:
    """The loss per counted target over the batches of every rank (each rank passes its own)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches:
        total += loss_of(batch).double()
        count += int((batch[1] != IGNORE_INDEX).sum())
    return (global_sum(total) / global_sum(count).clamp(min=1)).item()


class DDPEngine:
    def __init__(self, model: nn.Module, cfg: DictConfig, *, world: World, max_steps: int):
        self.model, self.world = model, world
        self.wrapped = DistributedDataParallel(model) if world.world_size > 1 else model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, max_steps)
        self.grad_clip = cfg.optim.grad_clip
        self.autocast = autocast_for(world.device, cfg.trainer.precision)
        self.restart_positions = restarts_positions(cfg)

    def _loss(self, batch: Batch) -> Tensor:
        return summed_loss(self.wrapped, batch, self.world.device, self.autocast, self.restart_positions)

    def train_step(self, micro_batches: list[Batch], guard: DivergenceGuard) -> StepResult:
        """Accumulate gradients over the micro-batches (syncing on the last), clip, and step.

        The loss is the mean over the step's counted targets on every rank (`counted_targets`).
        The guard sees the loss and the gradient norm before the step is applied; when it
        raises DivergenceError, the gradients are dropped and nothing changes.
        """
        self.wrapped.train()
        counted = counted_targets(micro_batches, self.world.device)
        # DDP averages gradients over the ranks: times world_size, each rank's sum then adds up to the step's.
        scale = self.world.world_size / counted
        loss_sum = torch.zeros((), device=self.world.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = nullcontext() if last or self.wrapped is self.model else self.wrapped.no_sync()
            with sync:
                loss = self._loss(batch)
                (loss * scale).backward()
            loss_sum += loss.detach()
        loss = (global_sum(loss_sum) / counted).item()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        try:
            guard.check_loss(loss)
            guard.check_grad_norm(grad_norm)
        except DivergenceError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, weight_norm=self.weight_norm())

    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Loss per counted target over the batches of every rank."""
        self.wrapped.eval()
        return mean_loss(self._loss, batches, self.world.device)

    def weight_norm(self) -> float:
        """The 2-norm of all weights (the same on every rank)."""
        return torch.nn.utils.get_total_norm(list(self.model.parameters())).item()

    def full_weights(self) -> AbstractContextManager:
        return nullcontext()  # every rank holds all weights

    def save(self, folder: Path) -> None:
        """Rank 0 writes model.safetensors and optimizer.pt (every rank holds the same)."""
        if self.world.is_main:
            weights = {name: tensor.detach().contiguous().cpu() for name, tensor in self.model.state_dict().items()}
            save_file(weights, folder / "model.safetensors")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, scheduler_state: dict) -> None:
        """Weights (checked against the model before any is applied), optimizer and schedule from `folder`."""
        weights = load_weights(folder, self.model.state_dict())
        if not (folder / "optimizer.pt").is_file():
            raise CheckpointError(f"checkpoint {folder} has no optimizer.pt: it was not written by the ddp engine")
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)


def load_weights(folder: Path, model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """model.safetensors of a (verified) checkpoint or export folder, checked against `model_state`."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no model.safetensors (a DeepSpeed checkpoint? turn it into one with "
            f"python launch/export.py ckpt={folder} out=<folder>)"
        )
    weights = load_file(path)
    check_fits(folder, weights, model_state)
    return weights
