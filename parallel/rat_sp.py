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
"""

import torch
import torch.distributed as dist
from torch import Tensor

import kernels
from kernels.rope import apply_rope, rope_angles
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
) -> Tensor:
    """RAT core on this rank's `[B, T_local, H, D]` tokens of a sequence split over `group` by `layout`.

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
        return kernels.rat(q, k, v, g, chunk_size=chunk_size, rope_base=rope_base)

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

    lengths = [piece.length for piece in pieces]
    q_pieces, k_pieces, v_pieces, g_pieces = (x.split(lengths, dim=1) for x in (q, k, v, g))
    own = [
        kernels.rat(
            q_piece, k_piece, v_piece, g_piece, chunk_size=chunk_size, rope_base=rope_base,
            chunk_start=piece.start // chunk_size, return_lse=True, return_summaries=True,
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
        outputs.append(_fold_in_prefix(out, lse, q_piece, prefix_k, prefix_v, piece.start, chunk_size, rope_base))
    return torch.cat(outputs, dim=1)


def _fold_in_prefix(
    out: Tensor, lse: Tensor, q: Tensor, prefix_k: Tensor, prefix_v: Tensor, start: int, chunk_size: int,
    rope_base: float | None,
) -> Tensor:
    """A piece's output once its queries also attend to the summaries `[B, C0, H, D]` of all earlier chunks."""
    if prefix_k.shape[1] == 0:
        # Nothing comes before the sequence's first piece. Adding the empty prefix's sum (0) keeps
        # the gathered summaries in this rank's graph, so that it joins their backward
        # reduce-scatter, which every other rank waits in.
        return out + prefix_v.sum().to(out.dtype)
    if rope_base is not None:
        chunk_ids = (start + torch.arange(q.shape[1], device=q.device)) // chunk_size
        q = apply_rope(q, *rope_angles(chunk_ids, q.shape[-1], rope_base))
    prefix_out, prefix_lse = kernels.attention(
        q, prefix_k.to(q.dtype), prefix_v.to(q.dtype), causal=False, return_lse=True
    )
    share = torch.sigmoid(prefix_lse - lse).transpose(1, 2)[..., None]  # the prefix's part of the whole softmax
    merged = out.to(share.dtype) + share * (prefix_out.to(share.dtype) - out.to(share.dtype))
    return merged.to(out.dtype)
