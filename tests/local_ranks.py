"""Run a function on real gloo ranks on this machine, for tests and benchmarks of the parallel ops."""

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    # Tear down together: a rank that destroys its group while a peer still talks to it aborts.
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ static destructors: under load, torch's store and gloo threads
    # can still be winding down, and destroying them joinable aborts the process
    # ("terminate called without an active exception") after the work has succeeded.
    os._exit(0)


# Ranks are forked from a fork server that imported these once, so that a rank starts in milliseconds
# rather than in the seconds a fresh interpreter takes to import torch and lsys (spawn, the safe default
# that fork is not once torch has threads, is what the server avoids paying each time).
PRELOAD = ["torch", "torch.distributed", "torch.multiprocessing", "lsys.train.trainer", "parallel", "kernels"]


def run_local_ranks(fn, world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks on this machine; re-raise the first failure."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    errors = context.SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(world_size, _free_port(), fn, args, errors), nprocs=world_size, start_method="forkserver"
        )
    except Exception as failure:
        message = errors.get() if not errors.empty() else str(failure)
        raise AssertionError(message) from None
