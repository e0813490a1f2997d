"""RAT over packed documents in torch: every document as if it ran alone (kernels/segments.py).

Alone, a document's chunks start at its first token. Packed, they start at positions the
sequence's grid of L tokens does not know, so the scan runs on the grid with a restart at
every document chunk's first token: a state carries over with a_t = g_t, except a_t = 0 at
a restart. A document chunk is at most L tokens, so it spans at most two grid blocks, and
the chunk running at the end of a block began inside that block: the block's own final
state is exact, and the tokens of the next block before its first restart add it times the
product of their gates (`initial_state` plays that part for the first block, for a sequence
that is a piece of a longer one).

A token of document chunk c then attends, in one softmax, to the summaries (final states) of
its document's complete chunks 0..c-1 and to its own state, with queries and summaries rotated
by their chunk index within the document. The summaries are gathered to ceil(T / L) slots per
row (a complete chunk has L tokens, so no more end in T), those that exist first.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kernels.rat.chunk import QUERY_BLOCK, gated_chunk_scan, softmax_with_own_state
from kernels.rope import apply_rope, rope_angles
from kernels.segments import positions_in_document


def chunk_end_slots(document_positions: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Where complete chunks end: the index `[B, S]` of their last tokens, in order and first, and
    whether each slot holds one `[B, S]`; S = ceil(T / L)."""
    ends = document_positions % chunk_size == chunk_size - 1
    slots = -(-ends.shape[1] // chunk_size)
    index = torch.argsort((~ends).to(torch.int8), dim=1, stable=True)[:, :slots]
    return index, ends.gather(1, index)


def rotate(x: Tensor, chunk_index: Tensor, rope_base: float | None, scale: float = 1.0) -> Tensor:
    """`x [B, N, H, D]` rotated by each row's chunk index `[B, N]`, times `scale`."""
    if rope_base is None:
        return x * scale if scale != 1.0 else x
    cos, sin = rope_angles(chunk_index, x.shape[-1], rope_base)
    return apply_rope(x, cos * scale, sin * scale)


def _attend_document_summaries(
    q: Tensor, keys: Tensor, values: Tensor, own_score: Tensor, own_value: Tensor,
    query_document: Tensor, query_chunk: Tensor, key_document: Tensor, key_chunk: Tensor, key_filled: Tensor,
) -> tuple[Tensor, Tensor]:
    """One softmax per token over its document's earlier summaries and its own state: (out, lse).

    q `[B, H, Q, D]` rotated and scaled; keys `[B, H, D, S]`, values `[B, H, S, D]`; own_score
    `[B, H, Q]`, own_value `[B, H, Q, D]`; documents and chunk indices `[B, Q]`, `[B, S]`, and
    whether each slot holds a summary `[B, S]`.
    """
    visible = (
        (key_document[:, None, :] == query_document[:, :, None])
        & (key_chunk[:, None, :] < query_chunk[:, :, None])
        & key_filled[:, None, :]
    )
    scores = (q @ keys).masked_fill_(~visible[:, None], float("-inf"))
    return softmax_with_own_state(scores, values, own_score, own_value)


def rat_documents(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int,
    rope_base: float | None,
    segment_ids: Tensor,
    document_offset: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RAT core on `[B, T, H, D]` with each document alone: (out, lse `[B, H, T]`, summary k~, v~ `[B, S, H, D]`).

    The summaries are those of `chunk_end_slots` (k~ rotated), zeros in empty slots.
    `document_offset [B]`: tokens of the first document before this sequence; `initial_state`
    (k~, v~) `[B, H, D]`: the running state there, taken up by the first document's first chunk.
    """
    batch, seq_len, heads, head_dim = q.shape
    dtype = torch.promote_types(q.dtype, g.dtype)
    positions = positions_in_document(segment_ids, 0 if document_offset is None else document_offset)
    chunk_index = positions // chunk_size

    blocks = -(-seq_len // chunk_size)
    pad = blocks * chunk_size - seq_len

    def to_grid(x: Tensor) -> Tensor:
        return F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)).view(batch, blocks, chunk_size, heads, head_dim)

    keep = F.pad((positions % chunk_size != 0).to(dtype), (0, pad)).view(batch, blocks, chunk_size, 1, 1)
    gates = to_grid(g)
    states, finals = gated_chunk_scan((to_grid(k), to_grid(v)), gates, keep)
    # The running state each grid block starts from (its tokens before the first restart take it up).
    if initial_state is None:
        first = finals.new_zeros(2, batch, 1, heads, head_dim)
    else:
        first = torch.stack([initial_state[0].to(dtype), initial_state[1].to(dtype)])[:, :, None]
    carried = torch.cat([first, finals[:, :, :-1]], dim=2)  # [2, B, C, H, D]
    decay = torch.cumprod(gates * keep, dim=2)
    k_state, v_state = (
        (state + decay * carry[:, :, None]).view(batch, blocks * chunk_size, heads, head_dim)[:, :seq_len]
        for state, carry in zip(states, carried)
    )

    index, filled = chunk_end_slots(positions, chunk_size)
    gather_index = index[..., None, None].expand(-1, -1, heads, head_dim)
    key_chunk = chunk_index.gather(1, index)
    key_document = segment_ids.gather(1, index)
    summary_k = rotate(k_state.gather(1, gather_index), key_chunk, rope_base) * filled[..., None, None]
    summary_v = v_state.gather(1, gather_index) * filled[..., None, None]

    scale = head_dim**-0.5
    rotated_q = rotate(q.to(dtype), chunk_index, rope_base, scale).transpose(1, 2)  # [B, H, T, D]
    # A query and its own state carry the same rotation, which cancels in their dot product.
    own_score = ((q.to(dtype) * k_state).sum(-1) * scale).transpose(1, 2)  # [B, H, T]
    own_value = v_state.transpose(1, 2)
    keys, values = summary_k.permute(0, 2, 3, 1), summary_v.transpose(1, 2)

    recompute = seq_len > QUERY_BLOCK and torch.is_grad_enabled()
    outs, lses = [], []
    for begin in range(0, seq_len, QUERY_BLOCK):
        end = min(begin + QUERY_BLOCK, seq_len)
        # Filled slots come first, in order: a block reads those that end before it does and do not
        # belong to documents that ended before its first token (the fewest over the rows are skipped).
        first = int((filled & (key_document < segment_ids[:, begin : begin + 1])).sum(1).min())
        last = max(first, int((filled & (index < end)).sum(1).max()))
        slots = slice(first, last)
        args = (
            rotated_q[:, :, begin:end], keys[..., slots], values[:, :, slots], own_score[:, :, begin:end],
            own_value[:, :, begin:end], segment_ids[:, begin:end], chunk_index[:, begin:end],
            key_document[:, slots], key_chunk[:, slots], filled[:, slots],
        )
        if recompute:
            out, lse = checkpoint(_attend_document_summaries, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out, lse = _attend_document_summaries(*args)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=-1)
    return out.transpose(1, 2).to(v.dtype), lse, summary_k, summary_v
