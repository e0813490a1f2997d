"""AdamW with decoupled weight decay on matrices only, and a learning-rate schedule with linear warmup.

Two schedules: cosine (decays over the whole run) and wsd, warmup-stable-decay (the peak lr held until
a final `decay_fraction` of the steps, then a linear decay). Under wsd most steps run at the peak, and a
run resumed with a larger trainer.max_steps during its stable phase simply stays at the peak longer.
"""

import math

import torch
from omegaconf import DictConfig
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices with weight decay; norms and biases (parameters under 2-D) without."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=False
    )


SCHEDULES = ("cosine", "wsd")


def lr_multiplier(
    step: int, *, schedule: str, max_steps: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float
) -> float:
    """LR multiplier: linear from 1/warmup to 1 over the warmup, then down to min_lr_ratio at max_steps, by a
    cosine over all the remaining steps, or (wsd) held at 1 until the last decay_steps and linear over them."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    progress = min(1.0, max(0, step - (max_steps - decay_steps)) / max(1, decay_steps))
    return 1.0 - (1 - min_lr_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`cfg.schedule` over `max_steps`, `warmup_fraction` of them spent warming up (wsd: the last
    `decay_fraction` of them decaying)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    shape = dict(
        schedule=cfg.schedule, max_steps=max_steps, warmup_steps=round(cfg.warmup_fraction * max_steps),
        decay_steps=round(cfg.decay_fraction * max_steps), min_lr_ratio=cfg.min_lr_ratio,
    )

    def multiplier(step: int) -> float:
        return lr_multiplier(step, **shape)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def apply_optimizer_settings(
    optimizer: torch.optim.AdamW, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: DictConfig
) -> None:
    """Put `cfg`'s lr, betas, eps and weight decay into a restored optimizer and schedule (resume_overrides=apply).

    The schedule keeps its position (the restored step count) and takes the new peak lr; its
    shape (warmup, minimum, length) is already this session's, as the scheduler is built from it.
    """
    decay_group, no_decay_group = optimizer.param_groups
    decay_group["weight_decay"], no_decay_group["weight_decay"] = cfg.weight_decay, 0.0
    for group in optimizer.param_groups:
        group["betas"], group["eps"], group["initial_lr"] = tuple(cfg.betas), cfg.eps, cfg.lr
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    # Recompute the current lr of every group at the restored position from the new peak.
    scheduler.last_epoch -= 1
    scheduler.step()
