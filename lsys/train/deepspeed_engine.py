"""The DeepSpeed ZeRO engine: `parallel.engine=deepspeed`, stages 0-3, optimizer and parameter offload.

The same interface as the DDP engine (lsys/train/engine.py). The optimizer is built here, then
handed to `deepspeed.initialize`, which partitions it (ZeRO-1/2: optimizer state and gradients;
ZeRO-3: parameters too) over every rank: DeepSpeed's data-parallel group is the whole world, so
dp x sp ranks all reduce gradients, while the sequence-parallel ops keep their own groups. With
offload the optimizer is DeepSpeed's CPU Adam (AdamW mode), the one that runs on host memory.

DeepSpeed keeps bf16 weights itself when bf16 is on (no autocast), and knows a step's gradient
norm only once the step is applied: a bad norm stops the run before that step is saved.
"""

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from lsys.data.packing import Batch
from lsys.train.checkpoint import ZERO_DIR, CheckpointError
from lsys.train.deepspeed_config import deepspeed_config
from lsys.train.engine import (
    StepResult, counted_targets, global_sum, mean_loss, restarts_positions, summed_loss, uses_bf16,
)
from lsys.train.guard import DivergenceGuard
from lsys.train.optim import build_optimizer, build_scheduler, parameter_groups
from parallel import World


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, cfg: DictConfig, *, world: World, max_steps: int):
        self.model, self.world = model, world
        self.stage = cfg.parallel.zero_stage
        config = deepspeed_config(cfg, world.world_size, bf16=uses_bf16(world.device, cfg.trainer.precision))
        if cfg.parallel.offload == "none":
            optimizer = build_optimizer(model, cfg.optim)
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optim = cfg.optim
            optimizer = DeepSpeedCPUAdam(
                parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                adamw_mode=True,
            )
        scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
        if self.stage == 3:
            # The tied head reads the embedding outside the embedding's own forward: ZeRO-3 must gather it for the LM's.
            deepspeed.zero.register_external_parameter(model, model.embed.weight)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.autocast = nullcontext()  # DeepSpeed casts the module itself when bf16 is on
        self.restart_positions = restarts_positions(cfg)

    def _loss(self, batch: Batch) -> Tensor:
        return summed_loss(self.wrapped, batch, self.world.device, self.autocast, self.restart_positions)

    def train_step(self, micro_batches: list[Batch], guard: DivergenceGuard) -> StepResult:
        """Backward each micro-batch (DeepSpeed reduces at the boundary), then step; the loss is the mean over
        the step's counted targets on every rank (`counted_targets`)."""
        self.wrapped.train()
        counted = counted_targets(micro_batches, self.world.device)
        # DeepSpeed averages gradients over the ranks (its data-parallel group is the world); the scale is ours
        # (scale_wrt_gas=False: no 1/grad_accum on top).
        scale = self.world.world_size / counted
        loss_sum = torch.zeros((), device=self.world.device)
        for index, batch in enumerate(micro_batches):
            loss = self._loss(batch)
            self.wrapped.backward(loss * scale, scale_wrt_gas=False)
            loss_sum += loss.detach().float()
            if index < len(micro_batches) - 1:
                self.wrapped.step()  # not a boundary: only counts the micro-step
        loss = (global_sum(loss_sum) / counted).item()
        guard.check_loss(loss)  # before the update
        lr = self.scheduler.get_last_lr()[0]
        # ZeRO-0 leaves whole, reduced gradients on every rank and reports no norm: measure it before clipping.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None] if self.stage == 0 else []
        own_norm = torch.nn.utils.get_total_norm(grads).item() if grads else None
        self.wrapped.step()  # clip, update, schedule
        grad_norm = self.wrapped.get_global_grad_norm()
        grad_norm = float(grad_norm if grad_norm is not None else own_norm)
        guard.check_grad_norm(grad_norm)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, weight_norm=self.weight_norm())

    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Loss per counted target over the batches of every rank."""
        self.wrapped.eval()
        return mean_loss(self._loss, batches, self.world.device)

    def weight_norm(self) -> float:
        """The 2-norm of all weights; under ZeRO-3 each rank holds a shard, so the shards' squares are summed."""
        if self.stage < 3:
            return torch.nn.utils.get_total_norm(list(self.model.parameters())).item()
        squares = sum(p.ds_tensor.float().pow(2).sum() for p in self.model.parameters())
        squares = torch.as_tensor(squares, device=self.world.device, dtype=torch.float32)
        if dist.is_initialized():
            dist.all_reduce(squares)
        return squares.sqrt().item()

    def full_weights(self) -> AbstractContextManager:
        """Under ZeRO-3, gather every weight on every rank for the duration (evaluation outside the engine)."""
        if self.stage < 3:
            return nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def save(self, folder: Path) -> None:
        """Every rank writes its shard of weights and optimizer state to folder/zero/."""
        self.wrapped.save_checkpoint(str(folder), tag=ZERO_DIR, save_latest=False)

    def load(self, folder: Path, scheduler_state: dict) -> None:
        if not (folder / ZERO_DIR).is_dir():
            raise CheckpointError(
                f"checkpoint {folder} has no {ZERO_DIR}/ folder: it was not written by the deepspeed engine "
                "(resume it with parallel.engine=ddp, or export its weights and start a new run)"
            )
        loaded, _ = self.wrapped.load_checkpoint(
            str(folder), tag=ZERO_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
        self.scheduler.load_state_dict(scheduler_state)
