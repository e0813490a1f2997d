"""Masked softmax attention in plain torch, one query chunk at a time: the readable definition.

Query row r sits at global position i = q_start + r and key column c at j = k_start + c.
Query i sees key j when (not causal or j <= i) and (window is None or i - j < window)
and (s2 is None or the S2 rule of kernels/attention/s2.py) and, given segment ids, when
both belong to one document (S2 then counts its blocks from each document's start). Then
    lse_i = log sum_{visible j} exp(scale * q_i . k_j),   out_i = sum_{visible j} exp(scale * q_i . k_j - lse_i) v_j,
and a row that sees no key has out_i = 0, lse_i = -inf (and zero gradients).

Memory: queries go in chunks of QUERY_CHUNK rows, and each chunk reads only the key range
that one of its rows can see (the causal bound above, the window bound below), so a
score block is at most [QUERY_CHUNK, Tk] per (batch, head) and key ranges that the whole
chunk cannot see (including those of documents none of its rows belongs to) are never
computed. When gradients are needed each chunk runs under activation checkpointing, so
backward recomputes the chunk's probabilities instead of keeping Tq x Tk of them alive
between forward and backward. Holes inside a chunk's key
range (S2's unseen blocks) are masked, not skipped; the Triton kernel skips them.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kernels.attention.s2 import S2Pattern
from kernels.segments import positions_in_document

QUERY_CHUNK = 256  # query rows per score block: bounds memory at QUERY_CHUNK * Tk scores per (batch, head)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and lse run in fp32 for fp32/fp16/bf16 inputs and stay in float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_mask(
    q_positions: Tensor,
    k_positions: Tensor,
    *,
    causal: bool,
    window: int | None,
    s2: S2Pattern | None,
    heads: int,
) -> Tensor | None:
    """Bool `[..., heads or 1, Tq, Tk]`: whether query i sees key j; None when every key is visible.

    Positions are `[Tq]`, `[Tk]`, or per batch row `[B, Tq]`, `[B, Tk]` (positions in their documents).
    """
    distance = q_positions[..., :, None] - k_positions[..., None, :]  # i - j
    mask = None
    if causal:
        mask = distance >= 0
    if window is not None:
        in_window = distance < window
        mask = in_window if mask is None else mask & in_window
    if s2 is not None:
        s2_mask = s2.token_mask(q_positions, k_positions, heads)
        return s2_mask if mask is None else mask[..., None, :, :] & s2_mask
    return None if mask is None else mask[..., None, :, :]


def same_document(q_segments: Tensor, k_segments: Tensor) -> Tensor:
    """Bool `[B, 1, Tq, Tk]`: whether query and key belong to one document."""
    return (q_segments[:, :, None] == k_segments[:, None, :])[:, None]


def attend_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_first: int,
    k_first: int,
    *,
    causal: bool,
    window: int | None,
    s2: S2Pattern | None,
    scale: float,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    q_doc_positions: Tensor | None = None,
    k_doc_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One score block: q `[B, Tc, H, D]` at global positions q_first.., k/v `[B, Kc, H, D]` at k_first..

    With segment ids `[B, Tc]`, `[B, Kc]` only keys of the query's document count, and S2's
    blocks are counted on the tokens' positions in their documents `[B, Tc]`, `[B, Kc]`.
    Returns out `[B, Tc, H, D]` in q's dtype and lse `[B, H, Tc]` in the compute dtype.
    """
    dtype = compute_dtype(q.dtype)
    heads = q.shape[2]
    # Positions are rebuilt here, not passed in as a mask, so that checkpointing keeps no [Tc, Kc] tensor alive.
    q_positions = torch.arange(q_first, q_first + q.shape[1], device=q.device)
    k_positions = torch.arange(k_first, k_first + k.shape[1], device=q.device)
    mask = visible_mask(q_positions, k_positions, causal=causal, window=window, s2=None, heads=heads)
    if s2 is not None:
        # Within one document, distances in it equal global ones: only S2's blocks need document positions.
        s2_mask = s2.token_mask(
            q_positions if q_doc_positions is None else q_doc_positions,
            k_positions if k_doc_positions is None else k_doc_positions,
            heads,
        )
        mask = s2_mask if mask is None else mask & s2_mask
    if q_segments is not None:
        same = same_document(q_segments, k_segments)
        mask = same if mask is None else mask & same

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    row_sees_key = None
    if mask is not None:
        row_sees_key = mask.any(dim=-1)  # [(B,) heads or 1, Tc]
        # A row that sees no key would make its softmax 0/0. Let it see every key so the
        # arithmetic stays finite, then overwrite its results; the overwrite also zeroes
        # its gradients, so no NaN reaches backward.
        scores = scores.masked_fill(~(mask | ~row_sees_key[..., None]), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tc]
    out = torch.einsum("bhqk,bkhd->bhqd", torch.softmax(scores, dim=-1), v.to(dtype))
    if row_sees_key is not None:
        out = out.masked_fill(~row_sees_key[..., None], 0.0)
        lse = lse.masked_fill(~row_sees_key, float("-inf"))
    return out.transpose(1, 2).to(q.dtype), lse


def visible_key_range(
    first_query: int, last_query: int, k_start: int, num_keys: int, *, causal: bool, window: int | None
) -> tuple[int, int]:
    """Columns `[begin, end)` of the keys that some query at positions first_query..last_query can see."""
    end = last_query + 1 - k_start if causal else num_keys
    begin = first_query - window + 1 - k_start if window is not None else 0
    begin = min(max(begin, 0), num_keys)
    return begin, min(max(end, begin), num_keys)


def document_key_range(q_segments: Tensor, k_segments: Tensor, begin: int, end: int) -> tuple[int, int]:
    """Narrow key columns `[begin, end)` to those in a document some query of the block belongs to."""
    # Ids are non-decreasing: the block's first and last rows bound its documents.
    first_row, last_row = q_segments[:, :1].contiguous(), q_segments[:, -1:].contiguous()
    keys = k_segments.contiguous()
    first = int(torch.searchsorted(keys, first_row, side="left").min())
    last = int(torch.searchsorted(keys, last_row, side="right").max())
    begin = min(max(begin, first), end)
    return begin, max(begin, min(end, last))


def attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    window: int | None,
    s2: S2Pattern | None,
    q_start: int,
    k_start: int,
    scale: float,
    segment_ids: Tensor | None = None,
    k_segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked attention of q `[B, Tq, H, D]` over k, v `[B, Tk, H, D]` by query chunks: (out, lse `[B, H, Tq]`).

    `segment_ids [B, Tq]` and `k_segment_ids [B, Tk]` (both or neither) keep each query to its
    document; with S2 the keys must be the queries' own tokens, whose document positions S2 uses.
    """
    # Checkpointing only pays when autograd would otherwise save each chunk's probabilities.
    recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    doc_positions = None
    if segment_ids is not None and s2 is not None:
        doc_positions = positions_in_document(segment_ids)
    outs, lses = [], []
    for row_begin in range(0, q.shape[1], QUERY_CHUNK):
        row_end = min(row_begin + QUERY_CHUNK, q.shape[1])
        col_begin, col_end = visible_key_range(
            q_start + row_begin, q_start + row_end - 1, k_start, k.shape[1], causal=causal, window=window
        )
        segments = {}
        if segment_ids is not None:
            col_begin, col_end = document_key_range(
                segment_ids[:, row_begin:row_end], k_segment_ids, col_begin, col_end
            )
            rows, cols = slice(row_begin, row_end), slice(col_begin, col_end)
            segments = dict(q_segments=segment_ids[:, rows], k_segments=k_segment_ids[:, cols])
            if doc_positions is not None:
                segments.update(q_doc_positions=doc_positions[:, rows], k_doc_positions=doc_positions[:, cols])
        # A chunk that sees no key still runs, on an empty key range: it costs nothing and
        # keeps its rows (zeros, -inf) connected to q, k and v for autograd.
        args = (
            q[:, row_begin:row_end], k[:, col_begin:col_end], v[:, col_begin:col_end],
            q_start + row_begin, k_start + col_begin,
        )
        options = dict(causal=causal, window=window, s2=s2, scale=scale, **segments)
        if recompute:
            # No randomness inside, so there is no RNG state to preserve for the recomputation.
            out, lse = checkpoint(attend_block, *args, use_reentrant=False, preserve_rng_state=False, **options)
        else:
            out, lse = attend_block(*args, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=-1)
