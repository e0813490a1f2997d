"""Differentiable collectives over a process group, each counting the bytes this rank sends.

Byte counts follow the usual algorithms, per rank and call: all-gather of n bytes sends
(P-1)*n, reduce-scatter of P*n bytes sends (P-1)*n, all-to-all of n bytes sends (P-1)/P*n,
a point-to-point send of n bytes sends n. Backward traffic is counted under the op's name
with ".backward" appended. `comm_stats()` reads the counters, `reset_comm_stats()` clears them.
"""

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

# The one piece of process-wide state besides the process groups themselves: what was sent.
_bytes_sent: Counter = Counter()
_calls: Counter = Counter()


def record_sent(op: str, nbytes: int) -> None:
    """Add `nbytes` sent by this rank to the counters of `op`."""
    _bytes_sent[op] += int(nbytes)
    _calls[op] += 1


def comm_stats() -> dict[str, dict[str, int]]:
    """{op: {"bytes": sent by this rank, "calls": calls}} since the last reset."""
    return {op: {"bytes": _bytes_sent[op], "calls": _calls[op]} for op in sorted(_calls)}


def reset_comm_stats() -> None:
    _bytes_sent.clear()
    _calls.clear()


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def _all_gather(x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    record_sent(op, (world - 1) * _nbytes(x))
    return torch.stack(parts)


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
    """Sum over ranks of `x [P, ...]`, rank r keeping row r."""
    world = dist.get_world_size(group)
    record_sent(op, (world - 1) * _nbytes(x[0]))
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(x[0])
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    # Gloo has no reduce-scatter: all-reduce and keep this rank's row (about twice the traffic;
    # counted as the reduce-scatter it stands in for).
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total[dist.get_rank(group)]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
        ctx.group, ctx.op = group, op
        return _all_gather(x, group, op)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank used every gathered part: the owner's gradient is the sum over ranks.
        return _reduce_scatter(grad, ctx.group, f"{ctx.op}.backward"), None, None


def all_gather(x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
    """`[P, *x.shape]`: every rank's `x`, differentiable (backward reduce-scatters the gradients)."""
    return _AllGather.apply(x, group, op)


def _all_to_all(x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
    world = dist.get_world_size(group)
    # Gradients often arrive as permuted views, whose strides empty_like would copy, while the
    # collective fills the output as contiguous memory.
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    record_sent(op, (world - 1) * _nbytes(x) // world)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
        ctx.group, ctx.op = group, op
        return _all_to_all(x, group, op)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Row r went to rank r and rank r's row came back here: the same exchange reverses it.
        return _all_to_all(grad, ctx.group, f"{ctx.op}.backward"), None, None


def all_to_all(x: Tensor, group: dist.ProcessGroup, op: str) -> Tensor:
    """Exchange rows of `x [P, ...]`: row r goes to rank r, and row r of the result came from rank r."""
    return _AllToAll.apply(x, group, op)
