"""Ring attention: exact softmax attention over a sequence split across the ranks of a ring.

Every rank keeps its queries while the K/V blocks travel around the ring (rank r sends to
r+1 and receives from r-1), so at step s rank r holds the K/V of ring rank (r - s) mod P.
Each (local query piece, visiting key piece) pair runs through kernels.attention at the
pieces' global positions, and the partial (out, lse) merge into fp32 accumulators (float64
for float64 inputs) with the stable form of ARCHITECTURE §3. The next hop starts before the
current block computes, so communication overlaps compute.

Backward replays the ring: each block's gradients come from recomputing its (out_b, lse_b)
and pushing the upstream gradient through the merge. A block's owner keeps its own share of
dK/dV; the other ranks' shares are summed on the way (the partial sum hops with the block)
and the last rank the block visits sends the sum straight back to the owner.

What is skipped, all decided from the piece lists, which every rank knows:
- compute: pairs that no query can see (causal: the key piece starts after the query piece
  ends; window: the key piece ends before the earliest query's window begins);
- communication: a block travels only as far as the farthest rank that sees some of it, and
  its dK/dV partial sum only that far and back. Causal + contiguous: block o goes P-1-o hops
  (half the ring's traffic); causal + contiguous + window <= T_local: one hop. Zigzag keeps
  the full ring (P-1 hops), causal or windowed alike: a rank's second piece sees the
  next rank's K/V, which is P-1 hops downstream.

Bytes sent by rank r per call (recorded as "ring_attention" and "ring_attention.backward"),
with a block's K/V of n bytes each (its own dtype) and its dK/dV of m bytes each (fp32, or
float64 for float64 inputs):
  forward:  2n per block that r passes on, i.e. per step s >= 1 with travel((r-s+1) mod P) >= s;
  backward: the same K/V hops, plus 2m per foreign block r holds (steps s >= 1 with
            travel((r-s) mod P) >= s), whose partial dK/dV it passes on or sends home.
Under causal zigzag or non-causal attention every travel is P-1: (P-1)*2n forward and
(P-1)*(2n + 2m) backward.

With the whole sequence's segment ids `[B, T]` (every rank has them: parallel/documents.py),
each pair passes its pieces' ids to the kernel, so queries see only their own documents.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from kernels import attention
from kernels.attention.naive import compute_dtype
from parallel.comm import record_sent
from parallel.layout import Piece, SequenceLayout

OP = "ring_attention"

Run = tuple[int, Piece]  # (local offset of the piece's first token, the piece)


def _runs(pieces: list[Piece]) -> list[Run]:
    """The pieces with their local offsets; neighbours in local order that continue each other join into one."""
    runs: list[Run] = []
    offset = 0
    for piece in pieces:
        if runs and runs[-1][1].end == piece.start:
            first_offset, last = runs[-1]
            runs[-1] = (first_offset, Piece(last.start, last.length + piece.length))
        else:
            runs.append((offset, piece))
        offset += piece.length
    return runs


def _visible(q_piece: Piece, k_piece: Piece, causal: bool, window: int | None) -> bool:
    """Whether some query of `q_piece` sees some key of `k_piece` (i sees j iff j <= i if causal, i - j < window)."""
    # The distances i - j over the two pieces fill [lowest, highest]; the mask allows [0 if causal, window - 1].
    lowest = q_piece.start - (k_piece.end - 1)
    highest = (q_piece.end - 1) - k_piece.start
    if causal:
        lowest = max(lowest, 0)
    if window is not None:
        highest = min(highest, window - 1)
    return lowest <= highest


@dataclass(frozen=True)
class _RingPlan:
    """Which pairs each rank computes and how far each block travels; identical on every rank."""

    rank: int
    world: int
    runs: list[list[Run]]  # per ring rank
    lengths: list[int]  # local tokens per ring rank
    travel: list[int]  # hops block o makes: the farthest ring distance of a rank that sees some of it
    causal: bool
    window: int | None

    @property
    def steps(self) -> int:
        return max(self.travel) + 1

    def owner(self, step: int) -> int:
        """The ring rank whose block this rank holds at `step` (if any)."""
        return (self.rank - step) % self.world

    def holds(self, step: int) -> bool:
        """Whether a block reaches this rank at `step` (the own block always does, at step 0)."""
        return self.travel[self.owner(step)] >= step

    def pairs(self, owner: int) -> list[tuple[Run, Run]]:
        """(query run, key run) pairs of this rank over `owner`'s block that some query sees."""
        return [
            (q_run, k_run)
            for q_run in self.runs[self.rank]
            for k_run in self.runs[owner]
            if _visible(q_run[1], k_run[1], self.causal, self.window)
        ]


def _plan(pieces: list[list[Piece]], rank: int, causal: bool, window: int | None) -> _RingPlan:
    world = len(pieces)
    runs = [_runs(rank_pieces) for rank_pieces in pieces]

    def sees(viewer: int, owner: int) -> bool:
        return any(_visible(q, k, causal, window) for _, q in runs[viewer] for _, k in runs[owner])

    travel = [
        max([(viewer - owner) % world for viewer in range(world) if sees(viewer, owner)], default=0)
        for owner in range(world)
    ]
    lengths = [sum(piece.length for piece in rank_pieces) for rank_pieces in pieces]
    return _RingPlan(rank=rank, world=world, runs=runs, lengths=lengths, travel=travel, causal=causal, window=window)


def _p2p(group: dist.ProcessGroup, sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]]) -> list:
    """Start sends and receives, each `(tensor, ring rank)`, as one batch; [] when there is nothing to move."""
    # P2POp takes global ranks (group_peer only exists from torch 2.6 on).
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _nbytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _block_like(local: Tensor, length: int) -> Tensor:
    """An empty buffer for a block of `length` tokens, shaped and typed like this rank's `local` block."""
    batch, _, heads, dim = local.shape
    return torch.empty(batch, length, heads, dim, dtype=local.dtype, device=local.device)


def _pass_kv(
    kv: tuple[Tensor, Tensor] | None, local: Tensor, step: int, group: dist.ProcessGroup, plan: _RingPlan
) -> tuple[list, tuple[Tensor, Tensor] | None, int]:
    """Start the hop to `step + 1`: pass the held block on if it travels farther, receive the one arriving.

    Returns the pending works, the arriving (k, v) buffers (None when no block arrives) and the bytes sent.
    """
    sends, arriving = [], None
    if plan.travel[plan.owner(step)] > step:  # then this rank holds the block, and it goes on
        sends = [(kv[0], (plan.rank + 1) % plan.world), (kv[1], (plan.rank + 1) % plan.world)]
    next_owner = plan.owner(step + 1)
    if step + 1 < plan.world and plan.travel[next_owner] > step:
        arriving = (_block_like(local, plan.lengths[next_owner]), _block_like(local, plan.lengths[next_owner]))
    recvs = [] if arriving is None else [(buffer, (plan.rank - 1) % plan.world) for buffer in arriving]
    return _p2p(group, sends, recvs), arriving, _nbytes(tuple(t for t, _ in sends))


def _pair_segments(segment_ids: Tensor | None, q_piece: Piece, k_piece: Piece) -> dict[str, Tensor]:
    """The kernel's segment-id arguments for one (query piece, key piece) pair; none without documents."""
    if segment_ids is None:
        return {}
    q_ids, k_ids = segment_ids[:, q_piece.start : q_piece.end], segment_ids[:, k_piece.start : k_piece.end]
    return dict(segment_ids=q_ids, k_segment_ids=k_ids)


def _merge(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a block's partial (out_b `[B, T, H, D]`, lse_b `[B, H, T]`) into the running (out, lse)."""
    block_seen, seen = lse_b > float("-inf"), lse > float("-inf")
    # sigmoid(lse_b - lse) is the block's share of the merged softmax. Rows where one side is
    # -inf are decided by where(): -inf - -inf would be NaN, and such a row takes all or nothing.
    share = torch.where(block_seen, torch.sigmoid(lse_b - lse), 0.0)
    merged_lse = torch.where(seen, lse - F.logsigmoid(lse - lse_b), lse_b)
    share = share.transpose(1, 2).unsqueeze(-1)
    return out - share * (out - out_b.to(out.dtype)), merged_lse


def _ring_forward(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, plan: _RingPlan, scale: float,
    segment_ids: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """This rank's merged (out `[B, T, H, D]` in q's dtype, lse `[B, H, T]` in the compute dtype)."""
    dtype = compute_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=dtype, device=q.device)
    kv, sent = (k, v), 0
    for step in range(plan.steps):
        works, arriving, nbytes = _pass_kv(kv, k, step, group, plan)
        sent += nbytes
        if plan.holds(step):
            for (q_offset, q_piece), (k_offset, k_piece) in plan.pairs(plan.owner(step)):
                rows, cols = slice(q_offset, q_offset + q_piece.length), slice(k_offset, k_offset + k_piece.length)
                out_b, lse_b = attention(
                    q[:, rows], kv[0][:, cols], kv[1][:, cols], causal=plan.causal, window=plan.window,
                    q_start=q_piece.start, k_start=k_piece.start, scale=scale, return_lse=True,
                    **_pair_segments(segment_ids, q_piece, k_piece), backend=backend,
                )
                out[:, rows], lse[..., rows] = _merge(out[:, rows], lse[..., rows], out_b, lse_b)
        _wait(works)
        kv = arriving
    if plan.world > 1:
        record_sent(OP, sent)
    return out.to(q.dtype), lse


def _block_grads(
    q: Tensor, kv: tuple[Tensor, Tensor], out: Tensor, lse: Tensor, dout: Tensor, dq: Tensor,
    pairs: list[tuple[Run, Run]], plan: _RingPlan, scale: float, segment_ids: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """(dK, dV) of the held block from this rank's queries; their dq is added into `dq` in place.

    `out`, `dout` are in the compute dtype. Each pair's (out_b, lse_b) is recomputed and the
    upstream gradient pushed through the merge, so the kernel's own backward does the rest.
    """
    dk = torch.zeros(kv[0].shape, dtype=dq.dtype, device=dq.device)
    dv = torch.zeros_like(dk)
    for (q_offset, q_piece), (k_offset, k_piece) in pairs:
        rows, cols = slice(q_offset, q_offset + q_piece.length), slice(k_offset, k_offset + k_piece.length)
        with torch.enable_grad():
            q_b, k_b, v_b = (t.detach().requires_grad_() for t in (q[:, rows], kv[0][:, cols], kv[1][:, cols]))
            out_b, lse_b = attention(
                q_b, k_b, v_b, causal=plan.causal, window=plan.window,
                q_start=q_piece.start, k_start=k_piece.start, scale=scale, return_lse=True,
                **_pair_segments(segment_ids, q_piece, k_piece), backend=backend,
            )
        # The merged out is sum_b w_b out_b with w_b = exp(lse_b - lse), so d out / d out_b = w_b and
        # d out / d lse_b = w_b (out_b - out). The merged lse is finite (every query sees its own key),
        # so a row the block does not reach (lse_b = -inf) gets w_b = 0.
        weight = torch.exp(lse_b - lse[..., rows])
        d_out_b = weight.transpose(1, 2).unsqueeze(-1) * dout[:, rows]
        d_lse_b = (d_out_b * (out_b.detach().to(dout.dtype) - out[:, rows])).sum(-1).transpose(1, 2)
        grad_q, grad_k, grad_v = torch.autograd.grad(
            (out_b, lse_b), (q_b, k_b, v_b), (d_out_b.to(out_b.dtype), d_lse_b)
        )
        dq[:, rows] += grad_q
        dk[:, cols] += grad_k
        dv[:, cols] += grad_v
    return dk, dv


def _ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    group: dist.ProcessGroup | None, plan: _RingPlan, scale: float, segment_ids: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this rank's q, k, v: the K/V ring again, with dK/dV partial sums hopping along."""
    dtype = compute_dtype(q.dtype)
    dout, out = dout.to(dtype), out.to(dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    kv, sent = (k, v), 0
    home = None  # this rank's own share of its dK/dV
    incoming, incoming_works = None, []  # the partial dK/dV sum of the block arriving at the next step
    returned = None  # the other ranks' shares of this rank's dK/dV, sent back by the block's last stop
    next_rank, prev_rank = (plan.rank + 1) % plan.world, (plan.rank - 1) % plan.world
    for step in range(plan.steps):
        works, arriving, nbytes = _pass_kv(kv, k, step, group, plan)
        sent += nbytes
        grads = None
        if plan.holds(step):
            grads = _block_grads(
                q, kv, out, lse, dout, dq, plan.pairs(plan.owner(step)), plan, scale, segment_ids, backend
            )
        _wait(incoming_works)
        if incoming is not None:
            grads = (grads[0] + incoming[0], grads[1] + incoming[1])
        if step == 0:
            home = grads
        # The partial sum starts at the first rank after the owner (the owner keeps its share at
        # home), hops along with the block and goes straight home from the block's last stop.
        sends, recvs, incoming = [], [], None
        if step >= 1 and grads is not None:
            owner = plan.owner(step)
            peer = next_rank if plan.travel[owner] > step else owner
            sends = [(grads[0], peer), (grads[1], peer)]
            sent += _nbytes(grads)
        if step >= 1 and step + 1 < plan.world and plan.travel[plan.owner(step + 1)] > step:
            length = plan.lengths[plan.owner(step + 1)]
            incoming = (_block_like(dq, length), _block_like(dq, length))
            recvs += [(buffer, prev_rank) for buffer in incoming]
        if step >= 1 and plan.travel[plan.rank] == step:
            returned = (torch.empty_like(home[0]), torch.empty_like(home[1]))
            recvs += [(buffer, (plan.rank + step) % plan.world) for buffer in returned]
        incoming_works = _p2p(group, sends, recvs)
        _wait(works)
        kv = arriving
    _wait(incoming_works)
    if returned is not None:
        home = (home[0] + returned[0], home[1] + returned[1])
    if plan.world > 1:
        record_sent(f"{OP}.backward", sent)
    return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, plan: _RingPlan, scale: float,
        segment_ids: Tensor | None, backend: str,
    ):
        # Point-to-point sends need contiguous memory.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _ring_forward(q, k, v, group, plan, scale, segment_ids, backend)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.group, ctx.plan, ctx.scale, ctx.backend = group, plan, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, segment_ids = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout, q, k, v, out, lse, ctx.group, ctx.plan, ctx.scale, segment_ids, ctx.backend
        )
        return dq, dk, dv, None, None, None, None, None


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        raise ValueError(
            f"ring_attention: q, k, v must be this rank's [B, T_local, H, D] tensors of one shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _ring(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in the ring; a missing group is a ring of one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ring_attention_pieces(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None,
    pieces: list[list[Piece]],
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of this rank's tokens over the whole sequence, where ring rank r holds `pieces[r]` (in local order).

    `segment_ids [B, T]`: the whole sequence's document ids (kernels/segments.py), on every rank.
    `backend`: that of every `kernels.attention` call, forward and backward (kernels/backend.py).
    """
    _check_shapes(q, k, v)
    rank, world = _ring(group)
    if len(pieces) != world:
        raise ValueError(f"ring_attention: got piece lists for {len(pieces)} ranks, but the ring has {world}")
    for ring_rank, rank_pieces in enumerate(pieces):
        if not rank_pieces or any(piece.length <= 0 or piece.start < 0 for piece in rank_pieces):
            raise ValueError(
                f"ring_attention: ring rank {ring_rank} needs at least one piece, each with start >= 0 and "
                f"length > 0; got {rank_pieces}"
            )
    local_len = sum(piece.length for piece in pieces[rank])
    if local_len != q.shape[1]:
        raise ValueError(
            f"ring_attention: this rank's pieces {pieces[rank]} hold {local_len} tokens, but q has T_local={q.shape[1]}"
        )
    if window is not None and window <= 0:
        raise ValueError(f"ring_attention: window must be a positive number of keys (or None), got {window}")
    seq_len = max(piece.end for rank_pieces in pieces for piece in rank_pieces)
    if segment_ids is not None and (segment_ids.shape[0] != q.shape[0] or segment_ids.shape[1] < seq_len):
        raise ValueError(
            f"ring_attention: segment_ids {tuple(segment_ids.shape)} must be the whole sequence's [B, T], "
            f"B = {q.shape[0]} and T >= {seq_len}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = _plan(pieces, rank, causal, window)
    if world == 1 and len(plan.runs[0]) == 1:
        # The local tokens are one run of the sequence: one kernel call, differentiated by the kernel itself.
        piece = plan.runs[0][0][1]
        ids = None if segment_ids is None else segment_ids[:, piece.start : piece.end]
        return attention(
            q, k, v, causal=causal, window=window, q_start=piece.start, k_start=piece.start, scale=scale,
            segment_ids=ids, backend=backend,
        )
    return _RingAttention.apply(q, k, v, group, plan, scale, segment_ids, backend)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of this rank's `[B, T_local, H, D]` tokens over the sequence split over `group` by `layout`.

    `segment_ids [B, T]`: the whole sequence's document ids, on every rank (parallel/documents.py).
    `backend`: that of every `kernels.attention` call (kernels/backend.py).
    """
    _check_shapes(q, k, v)
    _, world = _ring(group)
    sequence = SequenceLayout(layout, world)
    seq_len = q.shape[1] * world
    if world == 1:
        # One rank holds the whole sequence in order under every layout (zigzag's two chunks are adjacent).
        return ring_attention_pieces(
            q, k, v, group, [[Piece(0, seq_len)]], causal=causal, window=window, scale=scale,
            segment_ids=segment_ids, backend=backend,
        )
    if seq_len % sequence.unit():
        raise ValueError(
            f"ring_attention: the {layout} layout over {world} ranks needs T_local to be a multiple of "
            f"{sequence.pieces_per_rank}, got T_local={q.shape[1]}"
        )
    pieces = [sequence.pieces(ring_rank, seq_len) for ring_rank in range(world)]
    return ring_attention_pieces(
        q, k, v, group, pieces, causal=causal, window=window, scale=scale, segment_ids=segment_ids, backend=backend
    )
