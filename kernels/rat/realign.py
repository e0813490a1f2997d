"""Packed documents laid out for kernels that know only a fixed grid of chunks: `realign_documents`.

The fused RAT kernels (triton.py) restart the scan every L tokens and rotate chunk c by a table
row of its own. With segment ids a document's chunks start at its own first token, off that
grid, so every document of every row is laid end to end in ONE row (B' = 1), each starting at a
chunk boundary and its last chunk padded: pads have k = v = 0 and g = 0, so a pad restarts the
state, and the summary of a chunk that ends in pads (a document's partial last chunk) is never
visible, as no later chunk of its document exists. A piece of a longer sequence
(`document_offset [B]`: o tokens of its first document came before) places that document's
first token at o % L inside its chunk, and the slot just before it holds the carried state
with g = 0: h = g h + (1 - g) x then starts the chunk from exactly that state, and the
state's gradient comes back as that slot's dk, dv.

The kernels then need, per realigned chunk, its rotation (its chunk index within its document)
and the realigned chunks its document spans, so that summary s is visible to chunk c only when
the first chunk of c's document <= s < c. Everything here is a handful of `[B*T]` and `[C']`
index tensors; the moves in and out are index_copy and index_select, whose backwards (each the
other) autograd knows, and exact: every token has a slot of its own.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.rat.documents import chunk_end_slots
from kernels.segments import document_ends, document_starts, positions_in_document


@dataclass(frozen=True)
class Realignment:
    """Where the tokens of `[B, T]` packed documents go in the one realigned row of `num_slots` = C' * L."""

    chunk_size: int
    num_slots: int
    token_slots: Tensor  # [B*T] int64: each token's slot, tokens row-major
    carry_slots: Tensor  # [B] int64: the slot before each row's first token; num_slots (a discarded slot) if
    # the row's first token starts a chunk, where nothing is carried
    chunk_index: Tensor  # [C'] int64: each chunk's index within its document, the one it is rotated by
    document_first_chunk: Tensor  # [C'] int32: the first realigned chunk of each chunk's document
    document_end_chunk: Tensor  # [C'] int32: one past the last realigned chunk of each chunk's document
    summary_chunks: Tensor  # [B, S] int64: the realigned chunk of each `chunk_end_slots` slot
    summary_filled: Tensor  # [B, S] bool: whether the slot holds a summary


def realign_documents(segment_ids: Tensor, chunk_size: int, document_offset: Tensor | None = None) -> Realignment:
    """The realignment of `segment_ids [B, T]` (kernels/segments.py) for chunks of `chunk_size` tokens.

    One host sync: the realigned length sets the kernels' grid.
    """
    batch, seq_len = segment_ids.shape
    positions = positions_in_document(segment_ids, 0 if document_offset is None else document_offset)
    chunk = positions // chunk_size  # each token's chunk, counted from its document's start
    starts = document_starts(segment_ids)
    first_chunk = chunk.gather(1, starts)  # of each token's document: o // L for a row's first one, else 0
    num_chunks = chunk.gather(1, document_ends(segment_ids) - 1) - first_chunk + 1
    starts_document = torch.arange(seq_len, device=segment_ids.device) == starts

    # Documents in order, row after row. The running count of their chunks, read at any token of a
    # document, counts that document's chunks and all before it.
    first_chunk, num_chunks = first_chunk.flatten(), num_chunks.flatten()
    chunks_through = torch.cumsum(torch.where(starts_document.flatten(), num_chunks, 0), 0)
    document_base = chunks_through - num_chunks  # the document's first realigned chunk
    total_chunks = int(chunks_through[-1])
    # A document's chunk j (counted from its own start) lands on realigned chunk base + j - first_chunk.
    token_slots = (document_base - first_chunk) * chunk_size + positions.flatten()

    # Every realigned chunk of a document holds at least one of its tokens, so the tokens fill the
    # per-chunk tables (the tokens of one chunk all write the same values).
    chunk_tables = positions.new_empty(3, total_chunks)
    chunk_tables[:, token_slots // chunk_size] = torch.stack(
        [chunk.flatten(), document_base, document_base + num_chunks]
    )
    chunk_index, document_first_chunk, document_end_chunk = chunk_tables

    num_slots = total_chunks * chunk_size
    row_first_slot = token_slots.view(batch, seq_len)[:, 0]
    carry_slots = torch.where(positions[:, 0] % chunk_size != 0, row_first_slot - 1, num_slots)

    index, filled = chunk_end_slots(positions, chunk_size)
    return Realignment(
        chunk_size=chunk_size,
        num_slots=num_slots,
        token_slots=token_slots,
        carry_slots=carry_slots,
        chunk_index=chunk_index,
        document_first_chunk=document_first_chunk.to(torch.int32),
        document_end_chunk=document_end_chunk.to(torch.int32),
        summary_chunks=token_slots.view(batch, seq_len).gather(1, index) // chunk_size,
        summary_filled=filled,
    )


def to_realigned(x: Tensor, realignment: Realignment, carry: Tensor | None = None) -> Tensor:
    """`x [B, T, H, D]` in the realigned row `[1, T', H, D]`, zeros in the pads; `carry [B, H, D]` before each
    row's first token where it continues a chunk (x's dtype promoted to carry's, so the state is not rounded)."""
    _, _, heads, head_dim = x.shape
    dtype = x.dtype if carry is None else torch.promote_types(x.dtype, carry.dtype)
    # One slot past the row: carries of rows whose first token starts a chunk land there and are dropped.
    row = x.new_zeros(realignment.num_slots + 1, heads, head_dim, dtype=dtype)
    row = row.index_copy(0, realignment.token_slots, x.reshape(-1, heads, head_dim).to(dtype))
    if carry is not None:
        row = row.index_copy(0, realignment.carry_slots, carry.to(dtype))
    return row[None, : realignment.num_slots]


def from_realigned(x: Tensor, realignment: Realignment, batch: int) -> Tensor:
    """`x [1, T', H, D]` back to the tokens' places `[B, T, H, D]` (the pads dropped)."""
    return x[0].index_select(0, realignment.token_slots).view(batch, -1, *x.shape[2:])


def lse_from_realigned(lse: Tensor, realignment: Realignment, batch: int) -> Tensor:
    """`lse [1, H, T']` back to `[B, H, T]`."""
    heads = lse.shape[1]
    return lse[0].index_select(1, realignment.token_slots).view(heads, batch, -1).transpose(0, 1).contiguous()


def summaries_from_realigned(summaries: Tensor, realignment: Realignment) -> Tensor:
    """Summaries of every realigned chunk `[1, C', H, D]` in the slots of `chunk_end_slots` `[B, S, H, D]`, zeros
    in empty slots."""
    chunks = realignment.summary_chunks
    gathered = summaries[0].index_select(0, chunks.flatten()).view(*chunks.shape, *summaries.shape[2:])
    return gathered * realignment.summary_filled[..., None, None]
