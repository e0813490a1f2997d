"""LASP-2 (`parallel.lasp`) on real gloo ranks against single-process lightning attention.

Every rank builds the same full float64 inputs from a shared seed, runs
`kernels.linear_attention` on the whole sequence as the reference (forward and backward
with a fixed upstream gradient), shards it with `SequenceLayout`, and compares its local
output and the gradients of its local q, k, v with the reference's shards. The decays are
lightning's λ_h = exp(-2^(-8(h+1)/H)) with the last head set to a fast 0.5.

One error metric, `_rel_err`: max|a - b| / max|b| (b = the reference), at most 1e-9.
"""

import pytest
import torch
import torch.distributed as dist

import kernels
from kernels.linear_attention.chunk import BLOCK_SIZE
from parallel import SequenceLayout, comm_stats, lasp, reset_comm_stats
from tests.local_ranks import run_local_ranks

TOL = 1e-9
BATCH, HEADS = 2, 4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, with b the reference."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def _decays(heads: int) -> torch.Tensor:
    """Lightning attention's per-head decays, the last head replaced by a fast 0.5."""
    decay = torch.exp(-(2.0 ** (-8.0 * (torch.arange(heads, dtype=torch.float64) + 1) / heads)))
    decay[-1] = 0.5
    return decay


def _inputs(seq_len: int, key_dim: int, value_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-sequence q, k, v and the upstream gradient, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)

    def randn(dim: int) -> torch.Tensor:
        return torch.randn(BATCH, seq_len, HEADS, dim, generator=gen, dtype=torch.float64)

    return {"q": randn(key_dim), "k": randn(key_dim), "v": randn(value_dim), "grad_out": randn(value_dim)}


def _reference(full: dict[str, torch.Tensor], decay: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kernels.linear_attention on the whole sequence: the output and the gradients of q, k, v."""
    leaves = {name: full[name].clone().requires_grad_() for name in "qkv"}
    out = kernels.linear_attention(*leaves.values(), decay=decay)
    (out * full["grad_out"]).sum().backward()
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


# (layout, sequence length, Dk, Dv) per world size: every length is an odd multiple of the
# layout's unit (2P for zigzag, P for contiguous); the last cases' pieces span several
# kernel blocks, so the initial state meets the kernel's block chain.
CASES = {
    2: [("zigzag", 20, 4, 4), ("contiguous", 10, 4, 6), ("zigzag", 4 * (BLOCK_SIZE + 3), 4, 4)],
    4: [("zigzag", 40, 4, 4), ("contiguous", 20, 4, 6), ("contiguous", 4 * (2 * BLOCK_SIZE + 1), 4, 4)],
}


def _matches_reference(rank: int, world: int) -> None:
    group = dist.group.WORLD
    decay = _decays(HEADS)
    for seed, (layout, seq_len, key_dim, value_dim) in enumerate(CASES[world]):
        full = _inputs(seq_len, key_dim, value_dim, seed)
        ref_out, ref_grads = _reference(full, decay)
        sequence = SequenceLayout(layout, world)
        local = {name: sequence.shard(full[name], rank).requires_grad_() for name in "qkv"}

        reset_comm_stats()
        out = lasp(*local.values(), group, decay=decay, layout=layout)
        forward_stats = comm_stats()
        (out * sequence.shard(full["grad_out"], rank)).sum().backward()
        backward_stats = comm_stats()

        case = f"rank {rank}/{world} {layout} T={seq_len} Dk={key_dim} Dv={value_dim}"
        assert _rel_err(out, sequence.shard(ref_out, rank)) <= TOL, case
        for name in "qkv":
            assert _rel_err(local[name].grad, sequence.shard(ref_grads[name], rank)) <= TOL, f"{case} d{name}"

        # One [Dk, Dv] state per piece and head travels to the P-1 other ranks, whatever T is.
        state_bytes = (world - 1) * sequence.pieces_per_rank * BATCH * HEADS * key_dim * value_dim * 8
        assert forward_stats == {"lasp": {"bytes": state_bytes, "calls": 1}}, case
        assert backward_stats["lasp.backward"] == {"bytes": state_bytes, "calls": 1}, case


def _refuses_lengths_the_layout_cannot_split(rank: int, world: int) -> None:
    q = torch.randn(1, 7, HEADS, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not divisible by 4"):
        lasp(q, q, q, dist.group.WORLD, decay=_decays(HEADS), layout="zigzag")


@pytest.mark.parametrize("world", [2, 4])
def test_lasp_matches_single_process_linear_attention(world: int):
    run_local_ranks(_matches_reference, world)


def test_lasp_refuses_lengths_the_layout_cannot_split():
    run_local_ranks(_refuses_lengths_the_layout_cannot_split, 2)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_lasp_world_size_one_is_the_kernel_on_the_whole_sequence(layout: str):
    decay = _decays(HEADS)
    full = _inputs(18, 4, 4, seed=7)
    ref_out, ref_grads = _reference(full, decay)
    leaves = {name: full[name].clone().requires_grad_() for name in "qkv"}
    reset_comm_stats()
    out = lasp(*leaves.values(), None, decay=decay, layout=layout)
    (out * full["grad_out"]).sum().backward()
    assert comm_stats() == {}
    assert _rel_err(out, ref_out) <= TOL
    for name in "qkv":
        assert _rel_err(leaves[name].grad, ref_grads[name]) <= TOL, name


def test_lasp_names_disagreeing_shapes():
    q = torch.randn(1, 8, HEADS, 4)
    with pytest.raises(ValueError, match=r"agree on B, T_local, H.*\(1, 6, 4, 4\)"):
        lasp(q, torch.randn(1, 6, HEADS, 4), q, None, decay=_decays(HEADS))
    with pytest.raises(ValueError, match=r"decay must be a tensor of shape \[H\] = \[4\], got \(3,\)"):
        lasp(q, q, q, None, decay=_decays(3))
