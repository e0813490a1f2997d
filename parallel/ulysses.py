"""Ulysses sequence parallelism: trade the sequence split for a head split around any attention.

Each rank starts with its tokens (its pieces of the sequence, see layout.py) for all H heads.
One all-to-all of q, k, v (stacked, so one exchange) gives every rank all of the group's
tokens for H/P heads; the tokens are put in natural order (global positions ascending), an
attention that sees whole heads runs on them, and one all-to-all of the output undoes it.
Rank r keeps heads r*H/P .. (r+1)*H/P - 1, so per-head patterns (S2) see global head indices.

Hybrid: the all-to-all runs inside a ulysses group of U consecutive sp ranks, so each rank
then holds H/U heads of the union of its group's pieces, and ring attention over the ring
group (one rank per ulysses group, all holding the same heads) covers the rest.

Traffic per rank and call, for q of n bytes over P ranks: forward (P-1)/P * 3n for q, k, v
and (P-1)/P * n for the output, counted under "ulysses_attention"; backward the same under
"ulysses_attention.backward". Hybrid counts its all-to-alls under those names too; the ring
counts its own traffic under "ring_attention".
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import kernels
from parallel.comm import all_to_all
from parallel.layout import Piece, SequenceLayout
from parallel.ring import ring_attention_pieces

OP = "ulysses_attention"

# attn(q, k, v, head_start=...) on `[B, T, H_local, D]` tensors holding the group's tokens in
# natural order, for global heads head_start .. head_start + H_local - 1.
HeadAttention = Callable[..., Tensor]


@dataclass(frozen=True)
class _Run:
    """A piece as the all-to-all moves it: where it sits on its rank and in the gathered sequence."""

    rank: int  # group rank whose local tokens hold it
    local: int  # offset in that rank's local tokens
    natural: int  # offset in the group's tokens sorted by global position
    length: int


def _runs(pieces_by_rank: list[list[Piece]]) -> list[_Run]:
    """Every rank's pieces (in local order per rank), with their offsets in natural order."""
    located = []
    for rank, pieces in enumerate(pieces_by_rank):
        local = 0
        for piece in pieces:
            located.append((piece, rank, local))
            local += piece.length
    runs, natural = [], 0
    for piece, rank, local in sorted(located, key=lambda item: item[0].start):
        runs.append(_Run(rank, local, natural, piece.length))
        natural += piece.length
    return runs


def _group_size(group: dist.ProcessGroup | None) -> int:
    # No group (a lone process) is a group of one, as in the other sequence-parallel ops.
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check(q: Tensor, k: Tensor, v: Tensor, degree: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"Ulysses attention needs q, k, v of one shape [B, T_local, H, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads = q.shape[2]
    if heads % degree:
        raise ValueError(
            f"heads ({heads}) are not divisible by the Ulysses degree ({degree}); "
            f"choose a head count that is a multiple of {degree} or a smaller Ulysses degree"
        )


def _sequence_to_heads(qkv: list[Tensor], group: dist.ProcessGroup, degree: int, runs: list[_Run]) -> list[Tensor]:
    """Local `[B, T_local, H, D]` tensors -> `[B, T_group, H/P, D]`: all the group's tokens, natural order, my heads."""
    batch, local_len, heads, dim = qkv[0].shape
    # Row r of the exchange is what rank r gets: my tokens of its heads; stacking q, k, v makes it one call.
    send = torch.stack(
        [x.reshape(batch, local_len, degree, heads // degree, dim).permute(2, 0, 1, 3, 4) for x in qkv], dim=1
    )  # [P, 3, B, T_local, H/P, D]
    received = all_to_all(send, group, OP)  # row r: rank r's tokens of my heads
    gathered = torch.cat([received[run.rank, :, :, run.local : run.local + run.length] for run in runs], dim=2)
    return list(gathered.unbind(0))


def _heads_to_sequence(out: Tensor, group: dist.ProcessGroup, degree: int, runs: list[_Run]) -> Tensor:
    """The inverse of `_sequence_to_heads` for one tensor: `[B, T_group, H/P, D]` -> `[B, T_local, H, D]`."""
    batch, _, local_heads, dim = out.shape
    rows = []  # row r: rank r's tokens in its local order
    for rank in range(degree):
        rank_runs = sorted((run for run in runs if run.rank == rank), key=lambda run: run.local)
        rows.append(torch.cat([out[:, run.natural : run.natural + run.length] for run in rank_runs], dim=1))
    received = all_to_all(torch.stack(rows), group, OP)  # [P, B, T_local, H/P, D]; row r: my tokens of rank r's heads
    local_len = received.shape[2]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, local_len, degree * local_heads, dim)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, *, attn: HeadAttention, layout: str = "zigzag"
) -> Tensor:
    """`attn` over the group's whole sequence, run head-sharded; returns this rank's `[B, T_local, H, D]`."""
    degree = _group_size(group)
    _check(q, k, v, degree)
    if degree == 1:
        return attn(q, k, v, head_start=0)
    sequence = SequenceLayout(layout, degree)
    seq_len = q.shape[1] * degree
    runs = _runs([sequence.pieces(rank, seq_len) for rank in range(degree)])
    q_heads, k_heads, v_heads = _sequence_to_heads([q, k, v], group, degree, runs)
    local_heads = q.shape[2] // degree
    out = attn(q_heads, k_heads, v_heads, head_start=_group_rank(group) * local_heads)
    return _heads_to_sequence(out, group, degree, runs)


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group: dist.ProcessGroup | None,
    ring_group: dist.ProcessGroup | None,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal/window attention: Ulysses in each ulysses group, ring across them; returns `[B, T_local, H, D]`.

    `segment_ids [B, T]`: the whole sequence's document ids, on every rank (parallel/documents.py).
    `backend`: that of every `kernels.attention` call (kernels/backend.py).
    """
    degree, ring_size = _group_size(ulysses_group), _group_size(ring_group)
    _check(q, k, v, degree)
    if degree * ring_size == 1:
        return kernels.attention(
            q, k, v, causal=causal, window=window, scale=scale, segment_ids=segment_ids, backend=backend
        )
    # sp rank = ring rank * U + ulysses rank: ring rank j's ulysses group is sp ranks jU .. jU+U-1.
    sequence = SequenceLayout(layout, degree * ring_size)
    seq_len = q.shape[1] * degree * ring_size
    pieces = [  # [ring rank][ulysses rank] -> that sp rank's pieces
        [sequence.pieces(ring_rank * degree + rank, seq_len) for rank in range(degree)]
        for ring_rank in range(ring_size)
    ]
    options = dict(causal=causal, window=window, scale=scale, segment_ids=segment_ids, backend=backend)
    if degree == 1:
        # Nothing to exchange: plain ring attention over the layout's pieces.
        return ring_attention_pieces(q, k, v, ring_group, [group[0] for group in pieces], **options)
    # After the exchange ring rank j holds the union of its ulysses group's pieces, sorted by position
    # (the ring joins the ones that touch into single blocks).
    ring_pieces = [sorted((p for rank_pieces in group for p in rank_pieces), key=lambda p: p.start) for group in pieces]
    runs = _runs(pieces[_group_rank(ring_group)])
    q_heads, k_heads, v_heads = _sequence_to_heads([q, k, v], ulysses_group, degree, runs)
    out = ring_attention_pieces(q_heads, k_heads, v_heads, ring_group, ring_pieces, **options)
    return _heads_to_sequence(out, ulysses_group, degree, runs)
