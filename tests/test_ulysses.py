"""Ulysses and hybrid (Ulysses x ring) attention on real gloo ranks, against the single-process kernel in float64."""

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import kernels
from kernels import S2Pattern
from parallel import World, comm_stats, hybrid_attention, init_mesh, reset_comm_stats, ulysses_attention
from parallel.layout import LAYOUTS, SequenceLayout
from tests.local_ranks import run_local_ranks

BATCH, HEADS, HEAD_DIM = 2, 4, 8
TOLERANCE = 1e-9  # relative error; float64 end to end

# Head h sees, beyond its own block, the key blocks with (block + h) % 4 == 0: every head a
# different share, so a rank that used the wrong global head index would get wrong outputs.
S2 = S2Pattern(block_size=16, local_blocks=1, vert_stride=4, num_heads=HEADS)

ULYSSES_CASES = {
    "causal": dict(causal=True),
    "non-causal": dict(causal=False),
    "window": dict(causal=True, window=13),
    "s2": dict(causal=True, s2=S2),
}
HYBRID_CASES = {
    "causal": dict(causal=True),
    "window": dict(causal=True, window=13, scale=0.3),
}


def _seq_len(layout: SequenceLayout) -> int:
    """About 72 tokens (a few S2 blocks): an odd multiple of the layout's unit, so pieces are not block-aligned."""
    return layout.unit() * ((72 // layout.unit()) | 1)


def _head_attention(options: dict) -> Callable[..., Tensor]:
    """The attn callable for ulysses_attention: the kernel, with the S2 pattern moved to the local heads."""

    def attn(q: Tensor, k: Tensor, v: Tensor, head_start: int) -> Tensor:
        s2 = options.get("s2")
        return kernels.attention(q, k, v, **{**options, "s2": s2 and replace(s2, head_start=head_start)})

    return attn


def _errors(rank: int, layout: SequenceLayout, options: dict, op: Callable[..., Tensor], heads: int = HEADS) -> dict:
    """Relative errors of `op`'s local output and q, k, v gradients against the kernel on the full sequence."""
    seq_len = _seq_len(layout)
    generator = torch.Generator().manual_seed(seq_len)  # every rank builds the same full inputs
    q, k, v, upstream = (
        torch.randn(BATCH, seq_len, heads, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(4)
    )
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    reference = kernels.attention(*full, **options)
    reference.backward(upstream)

    local = [layout.shard(x, rank).requires_grad_() for x in (q, k, v)]
    out = op(*local)
    out.backward(layout.shard(upstream, rank))
    pairs = {"out": (out, reference)} | {f"d{name}": (x.grad, f.grad) for name, x, f in zip("qkv", local, full)}
    return {
        name: ((got - layout.shard(want, rank)).norm() / want.norm()).item() for name, (got, want) in pairs.items()
    }


def _ulysses_cases(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for kind in LAYOUTS:
        for name, options in ULYSSES_CASES.items():
            attn = _head_attention(options)
            errors = _errors(
                rank, SequenceLayout(kind, world), options,
                lambda q, k, v: ulysses_attention(q, k, v, group, attn=attn, layout=kind),
            )
            assert max(errors.values()) <= TOLERANCE, f"{name} attention, {kind} layout: {errors}"

    # Bytes: one exchange of stacked q, k, v and one of the output, each sending (P-1)/P of it; backward mirrors.
    causal = _head_attention(dict(causal=True))
    reset_comm_stats()
    _errors(rank, SequenceLayout("zigzag", world), dict(causal=True),
            lambda q, k, v: ulysses_attention(q, k, v, group, attn=causal))
    local_bytes = BATCH * _seq_len(SequenceLayout("zigzag", world)) // world * HEADS * HEAD_DIM * 8
    expected = (world - 1) * 3 * local_bytes // world + (world - 1) * local_bytes // world
    assert comm_stats() == {
        "ulysses_attention": {"bytes": expected, "calls": 2},
        "ulysses_attention.backward": {"bytes": expected, "calls": 2},
    }

    heads = 6 if world == 4 else 3
    with pytest.raises(ValueError, match=rf"heads \({heads}\) are not divisible by the Ulysses degree \({world}\)"):
        _errors(rank, SequenceLayout("zigzag", world), dict(causal=True),
                lambda q, k, v: ulysses_attention(q, k, v, group, attn=causal), heads=heads)


def _hybrid_cases(rank: int, world: int) -> None:
    # The mesh's groups: sp rank = ring rank * 2 + ulysses rank, as hybrid_attention assumes.
    mesh = init_mesh(World(rank, world, 0, torch.device("cpu")), sp=world, sp_mode="hybrid", ulysses=2)
    for kind in LAYOUTS:
        for name, options in HYBRID_CASES.items():
            errors = _errors(
                rank, SequenceLayout(kind, world), options,
                lambda q, k, v: hybrid_attention(q, k, v, mesh.ulysses_group, mesh.ring_group, layout=kind, **options),
            )
            assert max(errors.values()) <= TOLERANCE, f"hybrid {name} attention, {kind} layout: {errors}"


def _distributed_cases(rank: int, world: int) -> None:
    # One spawn per world size: starting ranks costs far more on this machine than the cases do.
    _ulysses_cases(rank, world)
    if world == 4:
        _hybrid_cases(rank, world)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_and_hybrid_match_single_process_attention(world: int):
    run_local_ranks(_distributed_cases, world)


def test_one_rank_calls_the_attention_directly():
    one_rank = SequenceLayout("contiguous", 1)
    s2 = ULYSSES_CASES["s2"]  # all four heads on the one rank: head_start must be 0
    errors = _errors(0, one_rank, s2, lambda q, k, v: ulysses_attention(q, k, v, None, attn=_head_attention(s2)))
    assert max(errors.values()) <= TOLERANCE, errors
    window = HYBRID_CASES["window"]
    errors = _errors(0, one_rank, window, lambda q, k, v: hybrid_attention(q, k, v, None, None, **window))
    assert max(errors.values()) <= TOLERANCE, errors
