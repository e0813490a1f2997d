"""Mesh, layouts and the counted differentiable collectives, on real gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from parallel import SequenceLayout, World, comm_stats, init_mesh, reset_comm_stats
from parallel.comm import all_gather, all_to_all
from parallel.mesh import mesh_problems
from tests.local_ranks import run_local_ranks


@pytest.mark.parametrize("kind, world", [("contiguous", 1), ("contiguous", 3), ("zigzag", 2), ("zigzag", 4)])
def test_layout_shards_cover_the_sequence_once(kind: str, world: int):
    layout = SequenceLayout(kind, world)
    x = torch.randn(2, 8 * world, 3)
    parts = [layout.shard(x, rank) for rank in range(world)]
    assert all(part.shape == (2, 8, 3) for part in parts)
    assert torch.equal(layout.unshard(parts), x)
    positions = torch.cat([layout.positions(rank, 8 * world) for rank in range(world)])
    assert sorted(positions.tolist()) == list(range(8 * world))
    if kind == "zigzag":
        assert layout.positions(0, 8 * world).tolist()[-1] == 8 * world - 1  # rank 0 also holds the last chunk


def test_layout_refuses_lengths_it_cannot_split():
    with pytest.raises(ValueError, match="not divisible by 4"):
        SequenceLayout("zigzag", 2).pieces(0, 10)


def _collectives(rank: int, world: int) -> None:
    reset_comm_stats()
    group = dist.group.WORLD
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = all_gather(x, group, "test.gather")
    assert gathered.shape == (world, 2, 3)
    assert [gathered[r, 0, 0].item() for r in range(world)] == [r + 1.0 for r in range(world)]
    # Rank r weights part p by (r + 1) * (p + 1): part p's gradient is (p + 1) * sum_r (r + 1).
    weights = torch.arange(1, world + 1, dtype=torch.float64)[:, None, None] * (rank + 1)
    (gathered * weights).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, (rank + 1) * world * (world + 1) / 2))

    rows = torch.arange(world, dtype=torch.float64)[:, None] + 10 * rank  # row r goes to rank r
    exchanged = all_to_all(rows.requires_grad_(), group, "test.a2a")
    assert exchanged[:, 0].tolist() == [rank + 10.0 * r for r in range(world)]
    stats = comm_stats()
    assert stats["test.gather"] == {"bytes": (world - 1) * 6 * 8, "calls": 1}
    assert stats["test.gather.backward"]["bytes"] == (world - 1) * 6 * 8
    assert stats["test.a2a"]["bytes"] == (world - 1) * world * 8 // world


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_forward_backward_and_byte_counts(world: int):
    run_local_ranks(_collectives, world)


def _mesh(rank: int, world: int, sp: int, mode: str, ulysses) -> None:
    mesh = init_mesh(World(rank, world, 0, torch.device("cpu")), sp=sp, sp_mode=mode, ulysses=ulysses)
    value = torch.tensor([float(rank)])
    for group, expected in (
        (mesh.sp_group, [mesh.dp_rank * sp + s for s in range(sp)]),
        (mesh.dp_group, [d * sp + mesh.sp_rank for d in range(mesh.dp)]),
    ):
        total = value.clone()
        dist.all_reduce(total, group=group)
        assert total.item() == sum(expected)
    if mode == "hybrid":
        assert dist.get_world_size(mesh.ulysses_group) == ulysses and dist.get_world_size(mesh.ring_group) == sp // ulysses


@pytest.mark.parametrize("sp, mode, ulysses", [(2, "ring", None), (4, "hybrid", 2), (2, "ulysses", None)])
def test_mesh_groups_hold_the_right_ranks(sp: int, mode: str, ulysses):
    run_local_ranks(_mesh, 4, sp, mode, ulysses)


def test_mesh_problems_are_named():
    assert mesh_problems(3, "ring", None, world_size=4) == ["parallel.sp (3) must divide the world size (4)"]
    assert mesh_problems(3, "ring", None) == []  # the world size is not known yet
    assert "parallel.ulysses (3) must divide parallel.sp (4)" in mesh_problems(4, "hybrid", 3)[0]
    assert "sp_mode must be one of" in mesh_problems(2, "star", None)[0]
    assert mesh_problems(0, "ring", None) == ["parallel.sp must be positive, got 0"]
