"""RAT-SP: sequence parallelism for the RAT core by all-gathering chunk summaries.

A token of RAT attends to the final states ("summaries") of earlier chunks plus its own
running state, and the running state restarts at every chunk. So when every piece a rank
holds is a whole number of chunks, the scan never crosses a rank, and all a rank needs
from the others is their chunk summaries: one (k~, v~) pair per chunk, T/L of them.

Per call, every rank:
1. runs `kernels.rat` on each local piece alone: its output over the piece's own chunks, the
   log of each token's softmax denominator (lse), and the piece's rotated summaries, all from
   one scan;
2. all-gathers the summaries once (op "rat_sp");
3. lets each piece's queries, rotated by their global chunk index, attend to the summaries of
   every chunk before the piece (all visible to all of its tokens), and folds that attention
   into the piece's own softmax with the two lse's, as ring attention merges its blocks:
   out = out_own + sigmoid(lse_prefix - lse_own) * (out_prefix - out_own).
Backward: the all-gather's autograd reduce-scatters the summary gradients to their owners.

With the whole sequence's segment ids (parallel/documents.py) chunks count from each
document's start, so a chunk may straddle two pieces: each rank first all-gathers the running
state at the end of its pieces (one (k~, v~) pair per piece; the chunk running there began in
the piece, as a piece holds at least L tokens), and a piece's first chunk takes up its
predecessor's. The summaries then travel as before, in the slots of
`kernels.rat.documents.chunk_end_slots`, and a piece attends to those of its own documents.
"""

import torch
import torch.distributed as dist
from torch import Tensor

import kernels
from kernels.rat.chunk import gated_chunk_scan
from kernels.rat.documents import chunk_end_slots, rotate
from kernels.segments import positions_in_document
from parallel.comm import all_gather
from parallel.layout import SequenceLayout


def rat_sp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    group: dist.ProcessGroup | None,
    *,
    chunk_size: int,
    rope_base: float | None = 10000.0,
    layout: str = "zigzag",
    segment_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """RAT core on this rank's `[B, T_local, H, D]` tokens of a sequence split over `group` by `layout`.

    `segment_ids [B, T]`: the whole sequence's document ids, on every rank (parallel/documents.py).
    `backend`: that of every kernels/ call, `kernels.rat` and `kernels.attention` (kernels/backend.py).

    Each rank sends (P-1) * 2 * B * (T_local / chunk_size) * H * D elements forward (the
    same backward) in k's dtype: chunk_size times fewer bytes than ring attention's
    (P-1) * 2 * B * T_local * H * D for the same K/V. Summaries are computed in the gate's
    precision and rounded to k's dtype only to travel (exact for fp32 and fp64 inputs).
    """
    if q.dim() != 4 or not (q.shape == k.shape == v.shape == g.shape):
        raise ValueError(
            f"rat_sp: q, k, v, g must share one [B, T_local, H, D] shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"rat_sp: chunk_size must be positive, got {chunk_size}")
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        # One rank holds the whole sequence, and both layouts keep it in order: one kernel call.
        return kernels.rat(
            q, k, v, g, chunk_size=chunk_size, rope_base=rope_base, segment_ids=segment_ids, backend=backend
        )

    local_len = q.shape[1]
    sequence = SequenceLayout(layout, world)
    pieces = sequence.pieces(dist.get_rank(group), local_len * world)
    if pieces[0].length % chunk_size:  # a layout's pieces all have the same length
        raise ValueError(
            f"rat_sp: each {layout} piece holds {pieces[0].length} tokens (local length {local_len} over "
            f"{len(pieces)} piece(s)), not a multiple of chunk_size {chunk_size}, so a chunk would span ranks; "
            f"make the sequence length a multiple of {chunk_size * sequence.unit()} "
            f"(chunk_size x {sequence.unit()} pieces)"
        )

    if segment_ids is not None:
        if tuple(segment_ids.shape) != (q.shape[0], local_len * world):
            raise ValueError(
                f"rat_sp: segment_ids {tuple(segment_ids.shape)} must be the whole sequence's [B, T] = "
                f"[{q.shape[0]}, {local_len * world}]"
            )
        return _rat_sp_documents(q, k, v, g, group, sequence, segment_ids, chunk_size, rope_base, backend)

    lengths = [piece.length for piece in pieces]
    q_pieces, k_pieces, v_pieces, g_pieces = (x.split(lengths, dim=1) for x in (q, k, v, g))
    own = [
        kernels.rat(
            q_piece, k_piece, v_piece, g_piece, chunk_size=chunk_size, rope_base=rope_base,
            chunk_start=piece.start // chunk_size, return_lse=True, return_summaries=True, backend=backend,
        )
        for piece, q_piece, k_piece, v_piece, g_piece in zip(pieces, q_pieces, k_pieces, v_pieces, g_pieces)
    ]
    # k and v summaries travel together: [2, B, C_local, H, D], one all-gather, in the inputs'
    # dtype (bf16 in training, like ring attention's K/V) so traffic is exactly 1/L of ring's.
    local_summaries = torch.stack([torch.cat([o[2] for o in own], dim=1), torch.cat([o[3] for o in own], dim=1)])
    summary_dtype = local_summaries.dtype
    gathered = all_gather(local_summaries.to(k.dtype), group, "rat_sp").to(summary_dtype)  # [P, 2, B, C_local, H, D]
    # Chunks are split over ranks exactly as tokens are (each piece is whole chunks), so the
    # same layout puts every rank's summaries back in global chunk order.
    summaries = sequence.unshard(list(gathered), dim=2)  # [2, B, C_total, H, D]

    outputs = []
    for piece, q_piece, (out, lse, _, _) in zip(pieces, q_pieces, own):
        prefix_k, prefix_v = summaries[:, :, : piece.start // chunk_size]
        outputs.append(
            _fold_in_prefix(out, lse, q_piece, prefix_k, prefix_v, piece.start, chunk_size, rope_base, backend)
        )
    return torch.cat(outputs, dim=1)


def _rat_sp_documents(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, group: dist.ProcessGroup, sequence: SequenceLayout,
    segment_ids: Tensor, chunk_size: int, rope_base: float | None, backend: str,
) -> Tensor:
    """rat_sp with each document alone (see the module docstring)."""
    rank, seq_len = dist.get_rank(group), segment_ids.shape[1]
    pieces = sequence.pieces(rank, seq_len)
    all_pieces = [piece for r in range(sequence.world_size) for piece in sequence.pieces(r, seq_len)]
    positions = positions_in_document(segment_ids)  # [B, T]
    lengths = [piece.length for piece in pieces]
    q_pieces, k_pieces, v_pieces, g_pieces = (x.split(lengths, dim=1) for x in (q, k, v, g))

    # 1. The running state at the end of each local piece: a scan of its last L tokens, with restarts.
    state_dtype = torch.promote_types(k.dtype, g.dtype)
    ends = []
    for piece, k_piece, v_piece, g_piece in zip(pieces, k_pieces, v_pieces, g_pieces):
        tail = slice(piece.length - chunk_size, piece.length)
        keep = (positions[:, piece.end - chunk_size : piece.end] % chunk_size != 0).to(state_dtype)
        streams = [x[:, tail][:, None].to(state_dtype) for x in (k_piece, v_piece)]  # one chunk of L tokens
        _, finals = gated_chunk_scan(streams, g_piece[:, tail][:, None].to(state_dtype), keep[:, None, :, None, None])
        ends.append(finals[:, :, 0])  # [2, B, H, D]
    # [P, pieces, 2, B, H, D], in k's dtype on the way like the summaries
    gathered_ends = all_gather(torch.stack(ends).to(k.dtype), group, "rat_sp").to(state_dtype)
    end_of = {piece.end: gathered_ends.flatten(0, 1)[index] for index, piece in enumerate(all_pieces)}

    # 2. Each piece on its own, its first chunk taking up the state its predecessor ended with.
    own = []
    for piece, q_piece, k_piece, v_piece, g_piece in zip(pieces, q_pieces, k_pieces, v_pieces, g_pieces):
        before = end_of.get(piece.start)
        own.append(kernels.rat(
            q_piece, k_piece, v_piece, g_piece, chunk_size=chunk_size, rope_base=rope_base,
            segment_ids=segment_ids[:, piece.start : piece.end], document_offset=positions[:, piece.start],
            initial_state=None if before is None else (before[0], before[1]),
            return_lse=True, return_summaries=True, backend=backend,
        ))

    # 3. Summaries of every piece in global order, and what each slot holds.
    local_summaries = torch.stack([torch.cat([o[2] for o in own], dim=1), torch.cat([o[3] for o in own], dim=1)])
    gathered = all_gather(local_summaries.to(k.dtype), group, "rat_sp").to(local_summaries.dtype)
    summaries = sequence.unshard(list(gathered), dim=2)  # [2, B, T / L, H, D]: each piece's slots, in order
    slot_position, slot_filled = [], []
    for piece in sorted(all_pieces, key=lambda p: p.start):
        index, filled = chunk_end_slots(positions[:, piece.start : piece.end], chunk_size)
        slot_position.append(piece.start + index)
        slot_filled.append(filled)
    slot_position, slot_filled = torch.cat(slot_position, dim=1), torch.cat(slot_filled, dim=1)

    # 4. Fold in the summaries of the pieces before each local one, those of its documents only.
    chunk_index = positions // chunk_size
    outputs = []
    for piece, q_piece, (out, lse, _, _) in zip(pieces, q_pieces, own):
        slots = piece.start // chunk_size  # every earlier piece's slots
        ids = segment_ids[:, piece.start : piece.end]
        if slots == 0:
            outputs.append(out)
            continue
        # Filled slots first, in order, so the keys' ids stay non-decreasing; empty ones get an id no query has.
        order = torch.argsort((~slot_filled[:, :slots]).to(torch.int8), dim=1, stable=True)
        filled = slot_filled[:, :slots].gather(1, order)
        key_ids = segment_ids.gather(1, slot_position[:, :slots].gather(1, order))
        key_ids = torch.where(filled, key_ids, segment_ids.max() + 1)
        gather_index = order[None, :, :, None, None].expand(2, -1, -1, *summaries.shape[-2:])
        prefix_k, prefix_v = summaries[:, :, :slots].gather(2, gather_index)
        rotated_q = rotate(q_piece, chunk_index[:, piece.start : piece.end], rope_base)
        prefix_out, prefix_lse = kernels.attention(
            rotated_q, prefix_k.to(q.dtype), prefix_v.to(q.dtype), causal=False, return_lse=True,
            segment_ids=ids, k_segment_ids=key_ids, backend=backend,
        )
        outputs.append(_merge(out, lse, prefix_out, prefix_lse))
    # Every rank must take part in the backward reduce-scatters, whether or not it read what came in:
    # empty sums (exactly 0) keep both gathered tensors in its graph.
    return torch.cat(outputs, dim=1) + (gathered_ends[..., :0].sum() + gathered[..., :0].sum()).to(q.dtype)


def _merge(out: Tensor, lse: Tensor, prefix_out: Tensor, prefix_lse: Tensor) -> Tensor:
    """A piece's output merged with its attention over earlier summaries: one softmax over both."""
    share = torch.sigmoid(prefix_lse - lse).transpose(1, 2)[..., None]  # the prefix's part of the whole softmax
    merged = out.to(share.dtype) + share * (prefix_out.to(share.dtype) - out.to(share.dtype))
    return merged.to(out.dtype)


def _fold_in_prefix(
    out: Tensor, lse: Tensor, q: Tensor, prefix_k: Tensor, prefix_v: Tensor, start: int, chunk_size: int,
    rope_base: float | None, backend: str,
) -> Tensor:
    """A piece's output once its queries also attend to the summaries `[B, C0, H, D]` of all earlier chunks."""
    if prefix_k.shape[1] == 0:
        # Nothing comes before the sequence's first piece. Adding the empty prefix's sum (0) keeps
        # the gathered summaries in this rank's graph, so that it joins their backward
        # reduce-scatter, which every other rank waits in.
        return out + prefix_v.sum().to(out.dtype)
    chunk_ids = (start + torch.arange(q.shape[1], device=q.device)) // chunk_size
    q = rotate(q, chunk_ids, rope_base)
    prefix_out, prefix_lse = kernels.attention(
        q, prefix_k.to(q.dtype), prefix_v.to(q.dtype), causal=False, return_lse=True, backend=backend
    )
    return _merge(out, lse, prefix_out, prefix_lse)
