"""RAT in whole chunks without a loop over the L steps: the fast torch form of naive.py.

The gated scan inside a chunk, h_t = g_t h_{t-1} + b_t with b_t = (1 - g_t) x_t and h_{-1} = 0,
composes like the pairs (g, b) under (g1, b1) then (g2, b2) = (g1 g2, g2 b1 + b2), an associative
operation, so a parallel prefix scan gives every h_t exactly in 2 log2(L) strided passes over the
chunk axis (Brent-Kung: spans of 2, 4, 8, ... steps, then the positions between them; `_scan`).
Nothing is divided or exponentiated, so any gate in [0, 1] is exact (the closed form with
cumulative log-gates overflows once a chunk's gates multiply below ~1e-38 in fp32). The backward
is the same scan run in reverse, lam_t = dh_t + g_{t+1} lam_{t+1}, then dx_t = (1 - g_t) lam_t and
dg_t = lam_t (h_{t-1} - x_t); k~ and v~ share one gate, so they are scanned together.

Attention then reads the states: a token of chunk c scores the summaries (final states) of
chunks before it and its own state. Its query and its own state carry the same inter-chunk
rotation, which cancels in their dot product, so only queries and summaries are rotated.

At L = 1 every token ends its chunk, so its own state is its chunk's summary and the layer is
causal attention over the summaries (1 - g) k, (1 - g) v with RoPE by position:
`rat_one_token_chunks` runs that through the fused scaled_dot_product_attention.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kernels.rope import apply_rope, rope_angles, rope_matrices

QUERY_BLOCK = 256  # query tokens per score block (rounded down to whole chunks)


def _scan(gates: Tensor, values: Tensor, *, reverse: bool = False) -> Tensor:
    """h_t = a_t h_{t-1} + b_t along dim -3 (h_t = a_t h_{t+1} + b_t if reverse), in place, by Brent-Kung.

    `values` holds the b_t and receives the h_t; `gates` holds the a_t (broadcast to values) and is
    overwritten with products of them. An up-sweep composes spans of 2, 4, 8, ... steps ending at
    every 2nd, 4th, 8th, ... position; a down-sweep then finishes each position in between from the
    finished prefix before its span. That is 2 log2(L) strided multiply-adds touching each position
    about twice, where a doubling (Hillis-Steele) scan rewrites every position log2(L) times.
    """
    length = values.shape[-3]

    def positions(first: int, step: int, count: int) -> slice:
        """first, first + step, ... (count of them), counted from the end if reverse."""
        if reverse:
            first = length - 1 - (first + step * (count - 1))
        return slice(first, first + step * (count - 1) + 1, step)

    def compose(targets: slice, sources: slice) -> None:
        # (a, b) at a target, preceded by the span (a', b') at its source: (a a', a b' + b).
        values[..., targets, :, :].addcmul_(spans[..., targets, :, :], values[..., sources, :, :])

    spans = gates  # spans[t]: the product of the a over the span that values[t] covers
    span = 1
    while 2 * span <= length:  # up-sweep: spans of 2 * span end at 2 * span - 1, 4 * span - 1, ...
        count = length // (2 * span)
        targets, sources = positions(2 * span - 1, 2 * span, count), positions(span - 1, 2 * span, count)
        compose(targets, sources)
        if 4 * span <= length:  # the longer spans (and the down-sweep) read this one's product
            spans[..., targets, :, :].mul_(spans[..., sources, :, :])
        span *= 2
    while span > 1:  # down-sweep: a position whose span is `span` long follows a finished prefix
        span //= 2
        if 3 * span <= length:
            count = (length - 3 * span) // (2 * span) + 1
            compose(positions(3 * span - 1, 2 * span, count), positions(2 * span - 1, 2 * span, count))
    return values


class _GatedChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, keep: Tensor | None, *streams: Tensor) -> tuple[Tensor, ...]:
        # The state carries over with a_t = g_t, or g_t * keep_t where `keep` is 0 at a restart.
        carry = g if keep is None else g * keep
        # b_t = (1 - g_t) x_t of every stream, written straight into the scan's [S, ...] buffer
        # (stacking the streams first would be one more pass over them).
        inputs = torch.empty((len(streams), *g.shape), dtype=g.dtype, device=g.device)
        for x, b in zip(streams, inputs):
            torch.addcmul(x, g, x, value=-1, out=b)
        states = _scan(carry.clone(), inputs)  # carry is saved for backward
        ctx.save_for_backward(g, carry, keep, states, *streams)
        ctx.set_materialize_grads(False)
        # Each stream's states as an output of its own (unbinding one output would cost a stack of
        # the gradients in backward), and each chunk's final state too: its gradient is then added
        # to one row, where slicing `states` would cost a zero-filled copy of all of them.
        return *states.unbind(0), states[..., -1, :, :].clone()

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        g, carry, keep, states, *streams = ctx.saved_tensors
        *grad_states, grad_finals = grads
        # The reverse scan's buffer [S, ...], which it overwrites with lam.
        lam = torch.stack([torch.zeros_like(g) if grad is None else grad for grad in grad_states])
        if grad_finals is not None:
            lam[..., -1, :, :] += grad_finals
        next_carry = F.pad(carry[..., 1:, :, :], (0, 0, 0, 0, 0, 1))  # a_{t+1}, and 0 past the chunk's end
        lam = _scan(next_carry, lam, reverse=True)
        grad_x = torch.addcmul(lam, g, lam, value=-1)  # (1 - g_t) lam_t
        # dg_t = sum over the streams (which share the gate) of lam_t (keep_t h_{t-1} - x_t), h_{-1} = 0
        grad_g = torch.empty_like(g)
        later, earlier = slice(1, None), slice(None, -1)
        torch.mul(lam[0][..., later, :, :], states[0][..., earlier, :, :], out=grad_g[..., later, :, :])
        for lam_s, states_s in zip(lam[1:], states[1:]):
            grad_g[..., later, :, :].addcmul_(lam_s[..., later, :, :], states_s[..., earlier, :, :])
        if keep is not None:
            grad_g[..., later, :, :] *= keep[..., later, :, :]
        grad_g[..., :1, :, :] = 0
        for lam_s, x in zip(lam, streams):
            grad_g.addcmul_(lam_s, x, value=-1)
        return grad_g, None, *grad_x.unbind(0)


def gated_chunk_scan(
    streams: Sequence[Tensor], g: Tensor, keep: Tensor | None = None
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Running states `[B, C, L, H, D]` of the streams `x [B, C, L, H, D]` (S of them, one tensor each)
    under one gate `g [B, C, L, H, D]`, restarting every chunk, and each chunk's final state `[S, B, C, H, D]`.

    `keep` (0 or 1, broadcast to g, no gradient): where 0, the state also restarts at that step.
    """
    *states, finals = _GatedChunkScan.apply(g, keep, *streams)
    return tuple(states), finals


def _chunk_rotations(first_chunk: int, num_chunks: int, head_dim: int, rope_base: float | None,
                     device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """RoPE matrices `[C, D, D]` of the global chunk indices first_chunk + c (None without RoPE)."""
    if rope_base is None:
        return None
    chunk_ids = torch.arange(first_chunk, first_chunk + num_chunks, device=device)
    return rope_matrices(chunk_ids, head_dim, rope_base).to(dtype)


def _rotate_chunks(x: Tensor, rotations: Tensor | None, scale: float = 1.0) -> Tensor:
    """Turn `x [B, C, ..., H, D]` by its chunk's matrix (every row of a chunk by one angle), times scale."""
    if rotations is None:
        return x * scale if scale != 1.0 else x
    rows = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])
    return (rows @ (rotations * scale if scale != 1.0 else rotations)).view(x.shape)


def _attend_summaries(
    q: Tensor, keys: Tensor, values: Tensor, own_score: Tensor, own_value: Tensor, first_chunk: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """One softmax over visible summaries and the own state, for a block of whole chunks: (out, lse).

    q `[B, H, Q, D]` rotated and scaled; keys `[B, H, D, S]` and values `[B, H, S, D]` the
    summaries some token of the block can see (prefix first); own_score `[B, H, Q]` and
    own_value `[B, H, Q, D]`. Token i of the block sits in chunk first_chunk + i // L and sees
    the first S - (chunks after its own) summaries.
    """
    num_visible = keys.shape[-1]
    scores = q @ keys
    last_chunk = first_chunk + (q.shape[2] - 1) // chunk_size
    token_chunk = first_chunk + torch.arange(q.shape[2], device=q.device) // chunk_size
    # The block's last chunk sees all S; a token `last_chunk - c` chunks earlier sees that many fewer.
    hidden = torch.arange(num_visible, device=q.device) >= num_visible - (last_chunk - token_chunk)[:, None]
    return softmax_with_own_state(scores.masked_fill_(hidden, float("-inf")), values, own_score, own_value)


def softmax_with_own_state(
    scores: Tensor, values: Tensor, own_score: Tensor, own_value: Tensor
) -> tuple[Tensor, Tensor]:
    """(out, lse) of one softmax over summary scores `[B, H, Q, S]` (-inf where hidden; used as
    scratch) with values `[B, H, S, D]`, and each token's own state: own_score `[B, H, Q]`,
    own_value `[B, H, Q, D]`. The own state is always visible, so no row is empty."""
    num_visible = scores.shape[-1]
    # The max only keeps exp in range; out and lse do not depend on it, so it takes no gradient.
    top = (torch.maximum(scores.amax(dim=-1), own_score) if num_visible else own_score).detach()
    weights = scores.sub_(top[..., None]).exp_()
    own_weight = torch.exp(own_score - top)
    total = weights.sum(dim=-1) + own_weight
    # Normalise the (few) weights rather than the [Q, D] output: one pass less over it.
    out = torch.addcmul((weights / total[..., None]) @ values, (own_weight / total)[..., None], own_value)
    return out, top + total.log()


def rat_chunk(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RAT core on `[B, T, H, D]`: (out, lse `[B, H, T]`, rotated summary keys and values `[B, T // L, H, D]`).

    lse is the log of the softmax's denominator (summaries and own state) in the compute dtype;
    the summaries are those of the complete chunks, as `chunk_summaries` gives them. Queries go
    in blocks of about QUERY_BLOCK tokens, each scoring only the summaries it can see; with more
    than one block and gradients needed, each block is recomputed in backward, so memory stays
    linear in T.
    """
    batch, seq_len, heads, head_dim = q.shape
    num_chunks = -(-seq_len // chunk_size)
    padded_len = num_chunks * chunk_size
    compute_dtype = torch.promote_types(q.dtype, g.dtype)

    def to_chunks(x: Tensor) -> Tensor:
        x = x.to(compute_dtype)
        if padded_len > seq_len:
            x = F.pad(x, (0, 0, 0, 0, 0, padded_len - seq_len))
        return x.view(batch, num_chunks, chunk_size, heads, head_dim)

    states, finals = gated_chunk_scan((to_chunks(k), to_chunks(v)), to_chunks(g))
    k_state, v_state = states  # [B, C, L, H, D] each
    rotations = _chunk_rotations(chunk_start, num_chunks, head_dim, rope_base, q.device, compute_dtype)
    summary_k = _rotate_chunks(finals[0], rotations)
    summary_v = finals[1]
    q_chunks = to_chunks(q)

    def heads_first(x: Tensor) -> Tensor:
        return x.reshape(batch, padded_len, heads, -1).transpose(1, 2)

    scale = head_dim**-0.5
    rotated_q = heads_first(_rotate_chunks(q_chunks, rotations, scale))
    # A query and its own state carry the same rotation, which cancels in their dot product.
    own_score = heads_first((q_chunks * k_state).sum(-1, keepdim=True) * scale)[..., 0]  # [B, H, T]
    own_value = heads_first(v_state)
    keys, values = summary_k.permute(0, 2, 3, 1), summary_v.transpose(1, 2)  # [B, H, D, C], [B, H, C, D]
    num_prefix = 0
    if prefix_k is not None:
        num_prefix = prefix_k.shape[1]
        keys = torch.cat([prefix_k.to(compute_dtype).permute(0, 2, 3, 1), keys], dim=-1)
        values = torch.cat([prefix_v.to(compute_dtype).transpose(1, 2), values], dim=-2)

    block = max(chunk_size, QUERY_BLOCK // chunk_size * chunk_size)
    recompute = padded_len > block and torch.is_grad_enabled()
    outs, lses = [], []
    for begin in range(0, padded_len, block):
        end = min(begin + block, padded_len)
        visible = num_prefix + end // chunk_size - 1  # what the block's last chunk sees
        args = (
            rotated_q[:, :, begin:end], keys[..., :visible], values[:, :, :visible],
            own_score[:, :, begin:end], own_value[:, :, begin:end], begin // chunk_size, chunk_size,
        )
        if recompute:
            out, lse = checkpoint(_attend_summaries, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out, lse = _attend_summaries(*args)
        outs.append(out)
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, dim=2), torch.cat(lses, dim=-1))
    complete = seq_len // chunk_size
    out = out.transpose(1, 2)[:, :seq_len].to(v.dtype)
    return out, lse[..., :seq_len], summary_k[:, :complete], summary_v[:, :complete]


def rat_one_token_chunks(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, rope_base: float | None = 10000.0, chunk_start: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """RAT core at L = 1 on `[B, T, H, D]`: (out, rotated summary keys and values `[B, T, H, D]`), as rat_chunk.

    No lse: the fused attention keeps it to itself. On CPU it takes about a quarter of rat_chunk's time at L = 1
    (`python launch/bench.py chunks`, docs/perf.md).
    """
    out_dtype, compute_dtype = v.dtype, torch.promote_types(q.dtype, g.dtype)
    q, k, v, g = (x.to(compute_dtype) for x in (q, k, v, g))
    keep = 1 - g
    summary_k, summary_v = keep * k, keep * v
    if rope_base is not None:
        positions = torch.arange(chunk_start, chunk_start + q.shape[1], device=q.device)
        cos, sin = rope_angles(positions, q.shape[-1], rope_base)
        q, summary_k = apply_rope(q, cos, sin), apply_rope(summary_k, cos, sin)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), summary_k.transpose(1, 2), summary_v.transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2).to(out_dtype), summary_k, summary_v


def chunk_summaries_chunk(
    k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int, rope_base: float | None = 10000.0, chunk_start: int = 0
) -> tuple[Tensor, Tensor]:
    """Rotated final states `(k~, v~) [B, T // L, H, D]` of the complete chunks, by the same scan."""
    batch, seq_len, heads, head_dim = k.shape
    num_chunks = seq_len // chunk_size
    compute_dtype = torch.promote_types(k.dtype, g.dtype)
    shape = (batch, num_chunks, chunk_size, heads, head_dim)

    def to_chunks(x: Tensor) -> Tensor:
        return x[:, : num_chunks * chunk_size].to(compute_dtype).reshape(shape)

    _, finals = gated_chunk_scan((to_chunks(k), to_chunks(v)), to_chunks(g))
    rotations = _chunk_rotations(chunk_start, num_chunks, head_dim, rope_base, k.device, compute_dtype)
    return _rotate_chunks(finals[0], rotations), finals[1]
