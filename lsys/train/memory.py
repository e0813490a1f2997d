"""How much each rank holds for training state, and whether it fits before anything is built.

Per parameter, in bytes: weights (4 in fp32, 2 when DeepSpeed trains in bf16), gradients (4, or 2
in DeepSpeed's bf16), AdamW's two moments (8), and under ZeRO (or DeepSpeed's bf16) a 4-byte fp32
master copy of the weights kept with the optimizer state. DDP's bf16 autocast keeps fp32 weights
and gradients. DDP keeps all of it on every rank. ZeRO-1 shards the optimizer state (master copy and
moments) over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too; offload moves the
optimizer state (and under ZeRO-3 the weights) to host memory, where it is counted apart.
Activations come on top and are not counted here, so a run that passes the check can still run
out of memory; one that fails cannot fit at all.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lsys.models import ModelConfig, build_model


@dataclass(frozen=True)
class TrainingState:
    """Bytes one rank holds: on the device (weights, gradients, optimizer state) and in host memory (offloaded)."""

    weights: float
    gradients: float
    optimizer: float
    offloaded: float

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def training_state(
    parameters: int, *, engine: str, zero_stage: int, offload: str, world_size: int, bf16: bool
) -> TrainingState:
    """What a rank holds for `parameters` under DDP or DeepSpeed ZeRO with this many ranks."""
    stage = zero_stage if engine == "deepspeed" else 0
    deepspeed_bf16 = engine == "deepspeed" and bf16  # DDP's autocast keeps fp32 weights and gradients
    weight_bytes, grad_bytes = (2, 2) if deepspeed_bf16 else (4, 4)
    # AdamW's moments, plus the fp32 master weights ZeRO partitions (kept even when the model is fp32).
    master_copy = engine == "deepspeed" and (stage >= 1 or bf16)
    optimizer_bytes = 8 + (4 if master_copy else 0)
    shards = world_size
    weights = parameters * weight_bytes / (shards if stage >= 3 else 1)
    gradients = parameters * grad_bytes / (shards if stage >= 2 else 1)
    optimizer = parameters * optimizer_bytes / (shards if stage >= 1 else 1)
    offloaded = 0.0
    if engine == "deepspeed" and offload in ("optimizer", "optimizer_and_params"):
        offloaded, optimizer = optimizer, 0.0
    if engine == "deepspeed" and offload == "optimizer_and_params":
        offloaded, weights = offloaded + weights, 0.0
    return TrainingState(weights=weights, gradients=gradients, optimizer=optimizer, offloaded=offloaded)


def available_bytes(device: torch.device, local_ranks: int) -> tuple[int, str]:
    """(bytes one rank may use, what they are) on `device`; on CPU the machine's memory shared by `local_ranks`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{torch.cuda.get_device_name(device)} has {free / 2**30:.1f} GiB free"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        total = int(fields["MemAvailable"].split()[0]) * 1024
    else:  # not Linux: all physical memory is the best estimate available without psutil
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = total // local_ranks
    return share, f"this machine has {total / 2**30:.1f} GiB available for {local_ranks} rank(s) ({share / 2**30:.1f} GiB each)"


def memory_problem(
    model_cfg: ModelConfig, device: torch.device, *, engine: str, zero_stage: int, offload: str, world_size: int,
    local_ranks: int, bf16: bool,
) -> str | None:
    """Why a rank's training state cannot fit where it must live (None when it can), in one line."""
    parameters = build_model(model_cfg, device="meta").num_params()
    state = training_state(
        parameters, engine=engine, zero_stage=zero_stage, offload=offload, world_size=world_size, bf16=bf16
    )
    # On CPU, device memory and host memory are one and the same.
    needed = state.device_total + (state.offloaded if device.type == "cpu" else 0.0)
    budget, description = available_bytes(device, local_ranks)
    if needed <= budget:
        return None
    setup = "DDP" if engine != "deepspeed" else f"ZeRO-{zero_stage}" + (f", offload {offload}" if offload != "none" else "")
    return (
        f"model {model_cfg.name} needs {needed / 2**30:.1f} GiB per rank for weights, gradients and optimizer state "
        f"({parameters:,} parameters, {setup}, {world_size} rank(s)) before any activation, but {description}: "
        "use more ranks, ZeRO (parallel.engine=deepspeed), a smaller model, or trainer.skip_memory_check=true to try anyway"
    )
