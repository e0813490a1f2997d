"""Ring attention against the single-process kernel on the whole sequence, on real gloo ranks and in one process."""

import pytest
import torch
import torch.distributed as dist

import kernels
import parallel.ring as ring
from parallel import Piece, SequenceLayout, comm_stats, reset_comm_stats, ring_attention, ring_attention_pieces
from tests.local_ranks import run_local_ranks

BATCH, HEADS, DIM = 2, 2, 16
FLOAT64_TOLERANCE = 1e-9

# (layout, causal, window, chunk): the sequence is `chunk` times the layout's unit (P, or 2P for
# zigzag) long, so each piece is `chunk` tokens and the length is a multiple of nothing larger.
LAYOUT_CASES = [
    ("zigzag", True, None, 3),
    ("contiguous", True, None, 3),
    ("zigzag", False, None, 3),
    ("contiguous", False, None, 3),
    ("zigzag", True, 2, 3),  # window inside a piece
    ("zigzag", True, 5, 3),  # window spanning pieces
    ("contiguous", True, 1, 3),  # every query sees only itself
    ("contiguous", True, 2, 3),
    ("contiguous", True, 7, 3),  # window spanning three pieces
    ("contiguous", False, 4, 3),
    ("zigzag", True, 11, 5),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, the one accuracy metric of this file.

    The floor on ||want|| only serves all-zero references (dq when every query sees just itself),
    which the result must then match to within 1e-12 * tolerance.
    """
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()


def _problem(seq_len: int, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Full-sequence q, k, v and an upstream gradient, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, seq_len, HEADS, DIM, generator=generator).to(dtype) for _ in range(4)]


def _reference(q, k, v, grad, *, causal: bool, window: int | None) -> list[torch.Tensor]:
    """out, dq, dk, dv over the whole sequence from the single-process kernel in float64."""
    q, k, v = (t.to(torch.float64, copy=True).requires_grad_() for t in (q, k, v))
    out = kernels.attention(q, k, v, causal=causal, window=window)
    out.backward(grad.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _positions(pieces: list[Piece]) -> torch.Tensor:
    return torch.cat([torch.arange(piece.start, piece.end) for piece in pieces])


def _check_against_reference(
    name: str, rank: int, pieces: list[list[Piece]], attend, *, causal: bool, window: int | None, seed: int,
    dtype: torch.dtype = torch.float64, tolerance: float = FLOAT64_TOLERANCE,
) -> None:
    """Run `attend(q, k, v)` on this rank's shard and compare out and dq, dk, dv with the reference's rows."""
    seq_len = sum(piece.length for rank_pieces in pieces for piece in rank_pieces)
    q, k, v, grad = _problem(seq_len, seed, dtype)
    want = _reference(q, k, v, grad, causal=causal, window=window)
    index = _positions(pieces[rank])
    local = [t.index_select(1, index).requires_grad_() for t in (q, k, v)]
    out = attend(*local)
    assert out.shape == local[0].shape and out.dtype == dtype, f"{name}: got {tuple(out.shape)} {out.dtype}"
    out.backward(grad.index_select(1, index))
    for what, got, full in zip(("out", "dq", "dk", "dv"), [out.detach(), *(t.grad for t in local)], want):
        error = relative_error(got, full.index_select(1, index))
        assert error <= tolerance, f"{name}, rank {rank}: {what} relative error {error:.2e} > {tolerance:.0e}"


def _block_bytes(local_len: int, itemsize: int = 8) -> int:
    """Bytes of one rank's K and V together (or dK and dV)."""
    return 2 * BATCH * local_len * HEADS * DIM * itemsize


def _sent_bytes(run) -> tuple[int, int]:
    """(forward, backward) bytes this rank sends for `run()`."""
    reset_comm_stats()
    run()
    stats = comm_stats()
    return stats["ring_attention"]["bytes"], stats["ring_attention.backward"]["bytes"]


def _total_over_ranks(value: int) -> int:
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item())


def _ring_cases(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for seed, (layout, causal, window, chunk) in enumerate(LAYOUT_CASES):
        sequence = SequenceLayout(layout, world)
        pieces = [sequence.pieces(r, chunk * sequence.unit()) for r in range(world)]
        _check_against_reference(
            f"{layout} causal={causal} window={window} T={chunk * sequence.unit()}", rank, pieces,
            lambda q, k, v: ring_attention(q, k, v, group, causal=causal, window=window, layout=layout),
            causal=causal, window=window, seed=seed,
        )

    # The hybrid op's pieces: ring rank r holds the union of two zigzag ranks' pieces, in their order.
    zigzag = SequenceLayout("zigzag", 2 * world)
    seq_len = 2 * zigzag.unit()
    hybrid = [zigzag.pieces(2 * r, seq_len) + zigzag.pieces(2 * r + 1, seq_len) for r in range(world)]
    for window in (None, 3):
        _check_against_reference(
            f"hybrid pieces window={window}", rank, hybrid,
            lambda q, k, v: ring_attention_pieces(q, k, v, group, hybrid, causal=True, window=window),
            causal=True, window=window, seed=100,
        )

    # Bytes: K/V go only as far as a rank that sees them, dK/dV partial sums only that far and home.
    local_len = 3
    q, k, v, _ = _problem(local_len * world, seed=7)
    local = [t[:, rank * local_len : (rank + 1) * local_len].requires_grad_() for t in (q, k, v)]
    block = _block_bytes(local_len)

    def sent(**options) -> tuple[int, int]:
        return _sent_bytes(lambda: ring_attention(*local, group, **options).sum().backward())

    # Causal contiguous: block o travels P-1-o hops, so rank r < P-1 passes on r+1 blocks, rank P-1 none;
    # rank r holds r foreign blocks and sends their partial dK/dV on (or home) once each.
    forward, backward = sent(causal=True, layout="contiguous")
    passed = rank + 1 if rank < world - 1 else 0
    assert (forward, backward) == (passed * block, (passed + rank) * block), (rank, forward, backward)
    if world == 2:  # rank 0's K and V go to rank 1 once; rank 1 sends rank 0's dK and dV home once
        assert (forward, backward) == ([block, 0][rank], block)
    assert _total_over_ranks(forward) == world * (world - 1) // 2 * block
    # A window no longer than a piece: one hop per block, except the last rank's, which nobody downstream sees.
    windowed_forward, windowed_backward = sent(causal=True, window=2, layout="contiguous")
    assert windowed_forward == (block if rank < world - 1 else 0)
    assert windowed_backward == windowed_forward + (block if rank > 0 else 0)
    assert _total_over_ranks(windowed_forward) == (world - 1) * block
    if world > 2:
        assert _total_over_ranks(windowed_forward) < _total_over_ranks(forward)
    # Non-causal: every block goes around the whole ring.
    forward, backward = sent(causal=False, layout="contiguous")
    assert (forward, backward) == ((world - 1) * block, 2 * (world - 1) * block)

    # Compute: under causal zigzag every rank holds every block, but a query run meets only the key
    # runs that start before it ends (skipping about half the pairs).
    chunk = 2
    zigzag = SequenceLayout("zigzag", world)
    q, k, v, _ = _problem(chunk * zigzag.unit(), seed=8)
    index = zigzag.positions(rank, chunk * zigzag.unit())
    calls = []
    kernel = ring.attention

    def counting_kernel(*args, **kwargs):
        calls.append((kwargs["q_start"], kwargs["k_start"]))
        return kernel(*args, **kwargs)

    ring.attention = counting_kernel
    try:
        with torch.no_grad():
            ring_attention(*(t.index_select(1, index) for t in (q, k, v)), group, causal=True, layout="zigzag")
    finally:
        ring.attention = kernel

    def runs(r: int) -> list[tuple[int, int]]:
        """(start, end) of rank r's runs: chunks r and 2P-1-r, which are adjacent (one run) on the last rank."""
        if r == world - 1:
            return [(r * chunk, (r + 2) * chunk)]
        return [(r * chunk, (r + 1) * chunk), ((2 * world - 1 - r) * chunk, (2 * world - r) * chunk)]

    expected = [(q0, k0) for q0, q1 in runs(rank) for owner in range(world) for k0, _ in runs(owner) if k0 < q1]
    assert sorted(calls) == sorted(expected), calls

    with pytest.raises(ValueError, match="multiple of 2"):
        ring_attention(q[:, :3], k[:, :3], v[:, :3], group, layout="zigzag")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_the_kernel_on_the_whole_sequence(world: int):
    run_local_ranks(_ring_cases, world)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 5), (False, None), (False, 3)])
def test_one_rank_matches_the_kernel_for_any_pieces(causal: bool, window: int | None):
    whole = [[Piece(0, 16)]]
    _check_against_reference(
        "one rank, zigzag", 0, whole,
        lambda q, k, v: ring_attention(q, k, v, None, causal=causal, window=window, layout="zigzag"),
        causal=causal, window=window, seed=1,
    )
    # Pieces out of order cannot be one kernel call: the ring's merge runs without communication.
    shuffled = [[Piece(10, 6), Piece(0, 4), Piece(4, 6)]]
    _check_against_reference(
        "one rank, shuffled pieces", 0, shuffled,
        lambda q, k, v: ring_attention_pieces(q, k, v, None, shuffled, causal=causal, window=window),
        causal=causal, window=window, seed=2,
    )


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs_merge_in_fp32(dtype: torch.dtype, tolerance: float):
    pieces = [[Piece(8, 8), Piece(0, 8)]]
    _check_against_reference(
        f"one rank, {dtype}", 0, pieces,
        lambda q, k, v: ring_attention_pieces(q, k, v, None, pieces, causal=True, window=6),
        causal=True, window=6, seed=3, dtype=dtype, tolerance=tolerance,
    )


def test_clear_errors():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="one shape"):
        ring_attention(q, q[:, :4], q, None)
    with pytest.raises(ValueError, match="hold 6 tokens, but q has T_local=8"):
        ring_attention_pieces(q, q, q, None, [[Piece(0, 6)]])
    with pytest.raises(ValueError, match="piece lists for 2 ranks, but the ring has 1"):
        ring_attention_pieces(q, q, q, None, [[Piece(0, 8)], [Piece(8, 8)]])
    with pytest.raises(ValueError, match="unknown sequence layout"):
        ring_attention(q, q, q, None, layout="striped")
    with pytest.raises(ValueError, match="window must be a positive"):
        ring_attention(q, q, q, None, window=0)
