"""RAT-SP (`parallel.rat_sp`) on real gloo ranks against the single-process RAT core.

Every rank builds the same full float64 inputs from a shared seed, runs `kernels.rat` on
the whole sequence as the reference (forward and backward with a fixed upstream
gradient), shards it with `SequenceLayout`, and compares its local output and the
gradients of its local q, k, v, g with the reference's shards.

One error metric, `_rel_err`: max|a - b| / max|b| (b = the reference), at most 1e-9.
"""

import pytest
import torch
import torch.distributed as dist

import kernels
from parallel import SequenceLayout, comm_stats, rat_sp, reset_comm_stats
from tests.local_ranks import run_local_ranks

TOL = 1e-9
BATCH, HEADS, HEAD_DIM = 2, 2, 8


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, with b the reference."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-sequence q, k, v, gates and the upstream gradient, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, seq_len, HEADS, HEAD_DIM)
    q, k, v, gate_logits, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5))
    return {"q": q, "k": k, "v": v, "g": torch.sigmoid(gate_logits), "grad_out": grad_out}


def _reference(full: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kernels.rat on the whole sequence: the output and the gradients of q, k, v, g."""
    leaves = {name: full[name].clone().requires_grad_() for name in "qkvg"}
    out = kernels.rat(*leaves.values(), chunk_size=chunk_size, rope_base=10000.0)
    (out * full["grad_out"]).sum().backward()
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


# (layout, sequence length, chunk size) per world size: every length is 3 x the unit the
# op needs (chunk_size x pieces), so it is a multiple of nothing larger.
CASES = {
    2: [("zigzag", 48, 4), ("contiguous", 24, 4), ("zigzag", 96, 8), ("contiguous", 48, 8)],
    4: [("zigzag", 96, 4), ("contiguous", 48, 4), ("zigzag", 192, 8)],
}


def _matches_reference(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for seed, (layout, seq_len, chunk_size) in enumerate(CASES[world]):
        full = _inputs(seq_len, seed)
        ref_out, ref_grads = _reference(full, chunk_size)
        sequence = SequenceLayout(layout, world)
        local = {name: sequence.shard(full[name], rank).requires_grad_() for name in "qkvg"}

        reset_comm_stats()
        out = rat_sp(*local.values(), group, chunk_size=chunk_size, rope_base=10000.0, layout=layout)
        forward_stats = comm_stats()
        (out * sequence.shard(full["grad_out"], rank)).sum().backward()
        backward_stats = comm_stats()

        case = f"rank {rank}/{world} {layout} T={seq_len} L={chunk_size}"
        assert _rel_err(out, sequence.shard(ref_out, rank)) <= TOL, case
        for name in "qkvg":
            assert _rel_err(local[name].grad, sequence.shard(ref_grads[name], rank)) <= TOL, f"{case} d{name}"

        # Only the summaries travel: a (k~, v~) pair per local chunk, sent to P-1 ranks.
        local_len = seq_len // world
        summary_bytes = 2 * BATCH * (local_len // chunk_size) * HEADS * HEAD_DIM * 8
        assert forward_stats == {"rat_sp": {"bytes": (world - 1) * summary_bytes, "calls": 1}}, case
        assert backward_stats["rat_sp.backward"] == {"bytes": (world - 1) * summary_bytes, "calls": 1}, case
        # Ring attention would send this rank's whole K/V shard to the P-1 others.
        ring_bytes = (world - 1) * (local["k"].nbytes + local["v"].nbytes)
        assert ring_bytes / forward_stats["rat_sp"]["bytes"] == chunk_size, case


def _refuses_bad_lengths(rank: int, world: int) -> None:
    group = dist.group.WORLD
    # Zigzag over 2 ranks cuts 24 tokens into pieces of 6: not whole chunks of 4.
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    g = torch.rand(1, 12, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"6 tokens .* not a multiple of chunk_size 4.* multiple of 16"):
        rat_sp(q, k, v, g, group, chunk_size=4, layout="zigzag")
    # The same local length splits into pieces of 12 = 3 chunks when contiguous.
    assert rat_sp(q, k, v, g, group, chunk_size=4, layout="contiguous").shape == q.shape
    # An odd local length cannot be cut into two zigzag pieces.
    with pytest.raises(ValueError, match="not divisible by 4"):
        rat_sp(q[:, :7], k[:, :7], v[:, :7], g[:, :7], group, chunk_size=1, layout="zigzag")


@pytest.mark.parametrize("world", [2, 4])
def test_rat_sp_matches_single_process_rat(world: int):
    run_local_ranks(_matches_reference, world)


def test_rat_sp_refuses_pieces_that_split_chunks():
    run_local_ranks(_refuses_bad_lengths, 2)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_rat_sp_world_size_one_is_the_kernel_on_the_whole_sequence(layout: str):
    # 20 tokens with chunks of 8: one rank needs no whole chunks per piece.
    full = _inputs(20, seed=7)
    ref_out, ref_grads = _reference(full, chunk_size=8)
    leaves = {name: full[name].clone().requires_grad_() for name in "qkvg"}
    reset_comm_stats()
    out = rat_sp(*leaves.values(), None, chunk_size=8, layout=layout)
    (out * full["grad_out"]).sum().backward()
    assert comm_stats() == {}
    assert _rel_err(out, ref_out) <= TOL
    for name in "qkvg":
        assert _rel_err(leaves[name].grad, ref_grads[name]) <= TOL, name


def test_rat_sp_names_disagreeing_shapes():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"share one \[B, T_local, H, D\] shape.*\(1, 7, 2, 4\)"):
        rat_sp(q, q, q, torch.rand(1, 7, 2, 4), None, chunk_size=4)
