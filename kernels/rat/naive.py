"""The RAT layer core in plain torch: the readable definition every backend must match.

Inside each chunk of L tokens a gated recurrence runs from a zero state,
    k~_t = g_t * k~_{t-1} + (1 - g_t) * k_t,    v~_t = g_t * v~_{t-1} + (1 - g_t) * v_t,
and a token of chunk c attends, with one softmax, over the final states ("chunk
summaries") of chunks 0..c-1 plus its own running state (k~_t, v~_t). Queries and
states are rotated by their global chunk index (inter-chunk RoPE), so a summary sits
at relative distance c - c' from the query and the token's own state at distance 0.

With segment ids (kernels/segments.py) each document runs alone: `rat_naive` on its tokens.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.rope import apply_rope, rope_angles


def chunk_scan(x: Tensor, g: Tensor, chunk_size: int) -> Tensor:
    """Gated running average restarting every chunk: `[B, C, L, H, D]` in, same out."""
    state = torch.zeros_like(x[:, :, 0])
    states = []
    for step in range(chunk_size):
        state = g[:, :, step] * state + (1 - g[:, :, step]) * x[:, :, step]
        states.append(state)
    return torch.stack(states, dim=2)


def rat_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int,
    rope_base: float | None = 10000.0,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    chunk_start: int = 0,
    return_lse: bool = False,
    segment_ids: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """RAT core on `[B, T, H, D]` inputs; any T (a partial last chunk's summary is never read).

    With `return_lse` also each token's log-sum-exp of its scores `[B, H, T]` (compute dtype).
    """
    if segment_ids is not None:
        return _each_document_alone(q, k, v, g, segment_ids, chunk_size=chunk_size, rope_base=rope_base,
                                    return_lse=return_lse)
    batch, seq_len, heads, head_dim = q.shape
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len

    def to_chunks(x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, pad)).view(batch, num_chunks, chunk_size, heads, head_dim)

    # The recurrence runs in the gate's precision (fp32 for the model) for stability.
    compute_dtype = torch.promote_types(q.dtype, g.dtype)
    q_c, k_c, v_c, g_c = (to_chunks(t.to(compute_dtype)) for t in (q, k, v, g))
    k_state = chunk_scan(k_c, g_c, chunk_size)
    v_state = chunk_scan(v_c, g_c, chunk_size)
    summaries_k, summaries_v = k_state[:, :, -1], v_state[:, :, -1]  # [B, C, H, D]

    if rope_base is not None:
        chunk_ids = torch.arange(chunk_start, chunk_start + num_chunks, device=q.device)
        cos, sin = rope_angles(chunk_ids, head_dim, rope_base)
        q_c = apply_rope(q_c.transpose(1, 2), cos, sin).transpose(1, 2)
        k_state = apply_rope(k_state.transpose(1, 2), cos, sin).transpose(1, 2)
        summaries_k = apply_rope(summaries_k, cos, sin)

    # Chunk c sees the prefix summaries and the local summaries of chunks before it.
    if prefix_k is not None:
        summaries_k = torch.cat([prefix_k.to(compute_dtype), summaries_k], dim=1)
        summaries_v = torch.cat([prefix_v.to(compute_dtype), summaries_v], dim=1)
    num_prefix = summaries_k.shape[1] - num_chunks
    visible = (
        torch.arange(summaries_k.shape[1], device=q.device)[None, :]
        < torch.arange(num_chunks, device=q.device)[:, None] + num_prefix
    )  # [C, C0 + C]

    scale = head_dim**-0.5
    scores_summaries = torch.einsum("bclhd,bshd->bhcls", q_c, summaries_k) * scale
    scores_summaries = scores_summaries.masked_fill(~visible[:, None, :], float("-inf"))
    score_own = torch.einsum("bclhd,bclhd->bhcl", q_c, k_state)[..., None] * scale
    scores = torch.cat([scores_summaries, score_own], dim=-1)
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhcls,bshd->bclhd", probs[..., :-1], summaries_v)
    out = out + probs[..., -1].permute(0, 2, 3, 1)[..., None] * v_state
    out = out.reshape(batch, num_chunks * chunk_size, heads, head_dim)[:, :seq_len].to(v.dtype)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores, dim=-1).flatten(2)[..., :seq_len]


def _each_document_alone(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, segment_ids: Tensor, **options
) -> Tensor | tuple[Tensor, Tensor]:
    """`rat_naive` on every document of every row by itself, put back in place."""
    rows = []
    for row in range(q.shape[0]):
        _, lengths = torch.unique_consecutive(segment_ids[row], return_counts=True)
        documents = zip(*(x[row : row + 1].split(lengths.tolist(), dim=1) for x in (q, k, v, g)))
        rows.append([rat_naive(*document, **options) for document in documents])
    if not options["return_lse"]:
        return torch.cat([torch.cat(row, dim=1) for row in rows])
    out = torch.cat([torch.cat([o for o, _ in row], dim=1) for row in rows])
    return out, torch.cat([torch.cat([lse for _, lse in row], dim=-1) for row in rows])


def chunk_summaries(
    k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int, rope_base: float | None = 10000.0, chunk_start: int = 0
) -> tuple[Tensor, Tensor]:
    """Rotated final states `(k~, v~) [B, C, H, D]` of the complete chunks: the prefix a later shard attends to."""
    batch, seq_len, heads, head_dim = k.shape
    num_chunks = seq_len // chunk_size
    shape = (batch, num_chunks, chunk_size, heads, head_dim)
    compute_dtype = torch.promote_types(k.dtype, g.dtype)
    g_c = g[:, : num_chunks * chunk_size].to(compute_dtype).reshape(shape)
    k_sum = chunk_scan(k[:, : num_chunks * chunk_size].to(compute_dtype).reshape(shape), g_c, chunk_size)[:, :, -1]
    v_sum = chunk_scan(v[:, : num_chunks * chunk_size].to(compute_dtype).reshape(shape), g_c, chunk_size)[:, :, -1]
    if rope_base is not None:
        chunk_ids = torch.arange(chunk_start, chunk_start + num_chunks, device=k.device)
        cos, sin = rope_angles(chunk_ids, head_dim, rope_base)
        k_sum = apply_rope(k_sum, cos, sin)
    return k_sum, v_sum
