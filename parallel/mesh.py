"""Process groups: start the default group from torchrun's environment, or run as one process."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> World:
    """Join the job torchrun started (env:// rendezvous) or describe a lone process; nccl on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier() -> None:
    """Wait for every rank; a no-op in a lone process."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear the default group down if this process started one."""
    if dist.is_initialized():
        dist.destroy_process_group()
