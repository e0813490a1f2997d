"""Engines run forward, backward and the optimizer step; DDP here, DeepSpeed ZeRO plugs in beside it.

An engine owns the wrapped model, optimizer and schedule, and exposes
`train_step(micro_batches) -> StepResult`, `evaluate(batches) -> float`, and the
state it saves: `model_state()`, `optimizer_state()`, `load(model_state, optimizer_state, scheduler_state)`.
"""

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lsys.train.guard import DivergenceError
from parallel import World

Batch = tuple[Tensor, Tensor]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    weight_norm: float  # of all weights after the update


def global_mean(value: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (a no-op in a lone process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= dist.get_world_size()
    return value


class DDPEngine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        world: World,
        grad_clip: float,
        precision: str,
    ):
        self.model = model
        self.wrapped = DistributedDataParallel(model) if world.world_size > 1 else model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.world, self.grad_clip = world, grad_clip
        use_bf16 = precision == "bf16" or (precision == "auto" and world.device.type == "cuda")
        self.autocast = (
            torch.autocast(world.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        with self.autocast:
            logits = self.wrapped(inputs.to(self.world.device, non_blocking=True))
        return F.cross_entropy(logits.flatten(0, 1), targets.to(self.world.device).flatten())

    def train_step(self, micro_batches: list[Batch], check: Callable[[float, float], None] | None = None) -> StepResult:
        """Accumulate gradients over the micro-batches (syncing on the last), clip, and step.

        Raises DivergenceError, without stepping, for a non-finite loss or grad norm, or when
        `check(loss, grad_norm)` raises it.
        """
        self.wrapped.train()
        loss_sum = torch.zeros((), device=self.world.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = nullcontext() if last or self.wrapped is self.model else self.wrapped.no_sync()
            with sync:
                loss = self._loss(inputs, targets) / len(micro_batches)
                loss.backward()
            loss_sum += loss.detach()
        # Every window is full, so the mean of per-rank means is the mean over all target tokens.
        loss = global_mean(loss_sum).item()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        try:
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise DivergenceError(f"non-finite loss {loss} or grad norm {grad_norm}")
            if check is not None:
                check(loss, grad_norm)
        except DivergenceError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, weight_norm=self.weight_norm())

    def weight_norm(self) -> float:
        """The 2-norm of all weights (the same on every rank)."""
        return torch.nn.utils.get_total_norm(list(self.model.parameters())).item()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean loss over the batches, averaged over ranks."""
        self.wrapped.eval()
        losses = [self._loss(inputs, targets) for inputs, targets in batches]
        return global_mean(torch.stack(losses).mean()).item()

    def model_state(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load(self, model_state: dict[str, Tensor], optimizer_state: dict, scheduler_state: dict) -> None:
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)


# `parallel.engine` picks one; DeepSpeed ZeRO joins here with the same interface.
ENGINES = {"ddp": DDPEngine}
