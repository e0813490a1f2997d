"""Masked softmax attention in plain torch, one query chunk at a time: the readable definition.

Query row r sits at global position i = q_start + r and key column c at j = k_start + c.
Query i sees key j when (not causal or j <= i) and (window is None or i - j < window)
and (s2 is None or the S2 rule of kernels/attention/s2.py). Then
    lse_i = log sum_{visible j} exp(scale * q_i . k_j),   out_i = sum_{visible j} exp(scale * q_i . k_j - lse_i) v_j,
and a row that sees no key has out_i = 0, lse_i = -inf (and zero gradients).

Memory: queries go in chunks of QUERY_CHUNK rows, and each chunk reads only the key range
that one of its rows can see (the causal bound above, the window bound below), so a
score block is at most [QUERY_CHUNK, Tk] per (batch, head) and key ranges that the whole
chunk cannot see are never computed. When gradients are needed each chunk runs under
activation checkpointing, so backward recomputes the chunk's probabilities instead of
keeping Tq x Tk of them alive between forward and backward. Holes inside a chunk's key
range (S2's unseen blocks) are masked, not skipped; the Triton kernel skips them.
"""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kernels.attention.s2 import S2Pattern

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
    """Bool `[heads or 1, Tq, Tk]`: whether query i sees key j; None when every key is visible."""
    distance = q_positions[:, None] - k_positions[None, :]  # i - j
    mask = None
    if causal:
        mask = distance >= 0
    if window is not None:
        in_window = distance < window
        mask = in_window if mask is None else mask & in_window
    if s2 is not None:
        s2_mask = s2.token_mask(q_positions, k_positions, heads)
        return s2_mask if mask is None else mask[None] & s2_mask
    return None if mask is None else mask[None]


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
) -> tuple[Tensor, Tensor]:
    """One score block: q `[B, Tc, H, D]` at global positions q_first.., k/v `[B, Kc, H, D]` at k_first..

    Returns out `[B, Tc, H, D]` in q's dtype and lse `[B, H, Tc]` in the compute dtype.
    """
    dtype = compute_dtype(q.dtype)
    heads = q.shape[2]
    # Positions are rebuilt here, not passed in as a mask, so that checkpointing keeps no [Tc, Kc] tensor alive.
    q_positions = torch.arange(q_first, q_first + q.shape[1], device=q.device)
    k_positions = torch.arange(k_first, k_first + k.shape[1], device=q.device)
    mask = visible_mask(q_positions, k_positions, causal=causal, window=window, s2=s2, heads=heads)

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    row_sees_key = None
    if mask is not None:
        row_sees_key = mask.any(dim=-1)  # [heads or 1, Tc]
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
) -> tuple[Tensor, Tensor]:
    """Masked attention of q `[B, Tq, H, D]` over k, v `[B, Tk, H, D]` by query chunks: (out, lse `[B, H, Tq]`)."""
    # Checkpointing only pays when autograd would otherwise save each chunk's probabilities.
    recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for row_begin in range(0, q.shape[1], QUERY_CHUNK):
        row_end = min(row_begin + QUERY_CHUNK, q.shape[1])
        col_begin, col_end = visible_key_range(
            q_start + row_begin, q_start + row_end - 1, k_start, k.shape[1], causal=causal, window=window
        )
        # A chunk that sees no key still runs, on an empty key range: it costs nothing and
        # keeps its rows (zeros, -inf) connected to q, k and v for autograd.
        args = (
            q[:, row_begin:row_end], k[:, col_begin:col_end], v[:, col_begin:col_end],
            q_start + row_begin, k_start + col_begin,
        )
        options = dict(causal=causal, window=window, s2=s2, scale=scale)
        if recompute:
            # No randomness inside, so there is no RNG state to preserve for the recomputation.
            out, lse = checkpoint(attend_block, *args, use_reentrant=False, preserve_rng_state=False, **options)
        else:
            out, lse = attend_block(*args, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=-1)
