"""Whether a run's training state fits before anything is built: one line instead of an allocator crash.

Under DDP every rank holds the whole model in fp32, its gradients and AdamW's two moments: 16
bytes a parameter. Activations come on top and are not counted here, so a run that passes
can still run out of memory; one that fails cannot fit at all. The budget is the free memory of
the rank's GPU, or on CPU the machine's available memory shared by this node's ranks.
"""

import os
from pathlib import Path

import torch

from lsys.models import ModelConfig, build_model

TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights 4 + gradients 4 + AdamW moments 8


def available_bytes(device: torch.device, local_ranks: int) -> tuple[int, str]:
    """(bytes one rank may use, what they are) on `device`, shared by `local_ranks` ranks on CPU."""
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


def memory_problem(model_cfg: ModelConfig, device: torch.device, local_ranks: int) -> str | None:
    """Why training state cannot fit on one rank (None when it can), in one line."""
    parameters = build_model(model_cfg, device="meta").num_params()
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    budget, description = available_bytes(device, local_ranks)
    if needed <= budget:
        return None
    return (
        f"model {model_cfg.name} needs {needed / 2**30:.1f} GiB per rank for weights, gradients and AdamW state "
        f"({parameters:,} parameters x {TRAINING_BYTES_PER_PARAMETER} bytes) before any activation, but "
        f"{description}: use a smaller model or a bigger machine, or trainer.skip_memory_check=true to try anyway"
    )
