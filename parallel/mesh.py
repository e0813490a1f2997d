"""Process groups: start the default group from torchrun's environment, or run as one process."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.layout import SequenceLayout


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", timeout_s: float | None = None) -> World:
    """Join the job torchrun started (env:// rendezvous) or describe a lone process; nccl on GPU, gloo on CPU.

    `timeout_s` bounds every collective: a rank that died or hangs ends the job with a timeout error
    instead of leaving the others waiting (None: torch's default, 10 minutes).
    """
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
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(
            backend=backend, store=_restart_store(rank, world_size, timeout), rank=rank, world_size=world_size,
            device_id=device if device.type == "cuda" else None, timeout=timeout,
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# What gloo's errors say when a collective timed out or lost its peer: it raises plain RuntimeErrors.
_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")


def collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost a rank (as opposed to a bug in the caller)."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(mark in str(error) for mark in _COLLECTIVE_FAILURES)
    )


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta | None) -> dist.Store | None:
    """After torchrun restarted the group (--max-restarts): its store, with a key space of this attempt's own.

    torchrun keeps the store of the first attempt, so the new ranks would read the dead ranks'
    addresses and fail to connect. None on a first attempt: init_process_group's own env:// store.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=not agent_store and rank == 0,
        timeout=timeout or datetime.timedelta(minutes=10),
    )
    return dist.PrefixStore(f"lsys/attempt-{attempt}", store)


def barrier() -> None:
    """Wait for every rank; a no-op in a lone process."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: object) -> object:
    """Rank 0's `value` (a small picklable object) on every rank; itself in a lone process."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown() -> None:
    """Tear the default group down if this process started one, and forget the mesh."""
    global _MESH
    _MESH = None
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Mesh:
    """Data parallel x sequence parallel ranks; the sp ranks of one dp replica are consecutive.

    Global rank = dp_rank * sp + sp_rank, and sp_rank = ring_rank * ulysses + ulysses_rank,
    so Ulysses' all-to-alls stay between neighbouring ranks (one node) and the ring spans groups.
    """

    world: World
    dp: int
    sp: int
    ulysses: int
    ring: int
    sp_mode: str  # "ring" | "ulysses" | "hybrid"
    layout: SequenceLayout
    dp_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None

    @property
    def dp_rank(self) -> int:
        return self.world.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.world.rank % self.sp


SP_MODES = ("ring", "ulysses", "hybrid")

# The one process-wide mesh, set by init_mesh; None until then (and in a lone process).
_MESH: Mesh | None = None


def mesh_problems(sp: int, sp_mode: str, ulysses: int | None, world_size: int | None = None) -> list[str]:
    """Every problem with an sp setting, and with its dp x sp split of `world_size` ranks once that is known."""
    problems = []
    if sp < 1:
        problems.append(f"parallel.sp must be positive, got {sp}")
    elif world_size is not None and world_size % sp:
        problems.append(f"parallel.sp ({sp}) must divide the world size ({world_size})")
    if sp_mode not in SP_MODES:
        problems.append(f"parallel.sp_mode must be one of {SP_MODES}, got {sp_mode!r}")
    if sp_mode == "hybrid" and (ulysses is None or ulysses < 1 or sp % ulysses):
        problems.append(f"parallel.ulysses ({ulysses}) must divide parallel.sp ({sp}) for sp_mode=hybrid")
    return problems


def init_mesh(world: World, sp: int = 1, sp_mode: str = "ring", ulysses: int | None = None, layout: str = "zigzag") -> Mesh:
    """Create the dp x sp process groups (every rank calls this) and make them the process's mesh."""
    global _MESH
    problems = mesh_problems(sp, sp_mode, ulysses, world.world_size)
    if problems:
        raise ValueError("; ".join(problems))
    ulysses = {"ring": 1, "ulysses": sp, "hybrid": ulysses}[sp_mode]
    ring = sp // ulysses
    dp = world.world_size // sp
    groups = {"dp": None, "sp": None, "ulysses": None, "ring": None}
    if dist.is_initialized():
        # new_group is collective: every rank creates every group, in the same order.
        for d in range(dp):
            ranks = list(range(d * sp, (d + 1) * sp))
            group = dist.new_group(ranks)
            if world.rank in ranks:
                groups["sp"] = group
            for r in range(ring):
                members = ranks[r * ulysses : (r + 1) * ulysses]
                group = dist.new_group(members)
                if world.rank in members:
                    groups["ulysses"] = group
            for u in range(ulysses):
                members = ranks[u::ulysses]
                group = dist.new_group(members)
                if world.rank in members:
                    groups["ring"] = group
        for s in range(sp):
            ranks = list(range(s, world.world_size, sp))
            group = dist.new_group(ranks)
            if world.rank in ranks:
                groups["dp"] = group
    _MESH = Mesh(
        world=world, dp=dp, sp=sp, ulysses=ulysses, ring=ring, sp_mode=sp_mode,
        layout=SequenceLayout(layout if sp > 1 else "contiguous", sp),
        dp_group=groups["dp"], sp_group=groups["sp"], ulysses_group=groups["ulysses"], ring_group=groups["ring"],
    )
    return _MESH


def current_mesh() -> Mesh | None:
    """The mesh set by init_mesh, or None."""
    return _MESH


def sequence_parallel() -> Mesh | None:
    """The mesh when sequences are split over more than one rank, else None (mixers then call kernels directly)."""
    return _MESH if _MESH is not None and _MESH.sp > 1 else None
