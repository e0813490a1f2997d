"""Fused Triton kernels for the RAT core (forward and backward); `naive.py` is the definition they match.

Shapes: q, k, v, g are `[B, T, H, D]` (any strides with a contiguous last dim); chunk c covers
tokens [c*L, (c+1)*L) and is rotated by its global index chunk_start + c (row c of a table); P
prefix summaries come before the C = ceil(T/L) local ones, so summary s is visible to chunk c when
s < P + c.

Forward, two launches:
1. `_summaries_kernel`: the gated scan of k and v over whole chunks, in registers; only each chunk's
   final state (k rotated) is written, to an fp32 buffer `[B, H, P + C, D]` that also holds the prefix.
2. `_forward_kernel`: per tile of whole chunks, an online softmax of the rotated queries over the
   visible summaries, then the token's own running state (recomputed by the same scan, rotated
   in-kernel) merged in the epilogue. Writes out and the fp32 log-sum-exp per token.

Backward, three launches, recomputing the probabilities from lse (nothing per token is stored but
out and lse):
1. `_delta_kernel`: delta_t = dO_t . o_t, the softmax-backward row term.
2. `_summary_grads_kernel`: per tile of summaries, like FlashAttention-2's dK/dV, the gradients of
   the summaries (rotated frame) accumulated over the query tiles that see them; the prefix
   gradients are the first P of them.
3. `_query_grads_kernel`: per tile of whole chunks, dq over the summaries, the gradient of each
   token's own running state, plus the summary gradient at each chunk's last token, then the
   reverse scan giving dk, dv and dg in one pass.

RoPE is rotate-half, so every [rows, D] tile is carried as two [rows, D/2] halves (lo, hi): rotation
is then elementwise and scores are two dots with K = D/2 (hence D >= 32, as tl.dot needs 16).
The cos/sin of each chunk are a small [C, D/2] table computed in float64 on the host (one row per
chunk, L times smaller than q), which is both cheaper than transcendental math in the inner loops
and exact at large chunk indices.

Packed documents (`rat_documents_triton`) run on the same kernels: the documents are first laid
end to end in one row, each starting on a chunk boundary (kernels/rat/realign.py), so the scan's
restarts and the summaries are the grid's; a chunk's table row then holds its index within its
document, and with the DOCUMENTS flag (no prefix) two [C] int32 inputs give each chunk's document's
first and end chunk: summary s is visible to chunk c only when doc_first[c] <= s < c, and the
summary loops start and stop at the documents' bounds. Without the flag the kernels are as before.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.backend import interpreting, new_output, pinned_configs
from kernels.rat.realign import (
    from_realigned, lse_from_realigned, realign_documents, summaries_from_realigned, to_realigned,
)
from kernels.rope import rope_angles

# Query tiles are whole chunks: every BLOCK_M below is a multiple of every supported chunk size.
# The first config is the one the interpreter runs: small summary tiles so that the tests, with
# a few dozen summaries, go through several of them.
_QUERY_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
_SUMMARY_TILE_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_M": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128}, num_warps=8, num_stages=2),
]
_SCAN_BLOCK_M = 64  # rows per program of the element-wise kernels (a multiple of every chunk size)


# --------------------------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------------------------- #
# Compiled, the scans use tl.associative_scan (warp shuffles). The interpreter runs a generic
# associative_scan one element at a time in Python, far too slow for the tests, so there the same
# recurrence runs as a Hillis-Steele scan of log2(L) whole-tile steps (tl.gather of shifted rows).
_NATIVE_SCAN = tl.constexpr(not interpreting())


@triton.jit
def _combine_affine(gate_a, shift_a, gate_b, shift_b):
    """Compose the maps x -> gate_a*x + shift_a, then x -> gate_b*x + shift_b: a first-order recurrence."""
    return gate_a * gate_b, shift_a * gate_b + shift_b


@triton.jit
def _chunk_linear_scan(gate, shift, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive scan of state = gate*state + shift down the rows of each chunk of a tile (up them if REVERSE).

    The tile holds whole chunks and a chunk's first (last, if REVERSE) gate is zero, so a scan over
    the whole tile never carries a state across a chunk boundary.
    """
    if _NATIVE_SCAN:
        _, state = tl.associative_scan((gate, shift), 0, _combine_affine, reverse=REVERSE)
        return state
    else:
        rows = tl.arange(0, gate.shape[0])
        position = rows % CHUNK
        broadcast = tl.zeros(gate.shape, dtype=tl.int32)
        # After the step of stride s, each row holds the composition of the (up to) 2s rows ending at it.
        for step in tl.static_range(6):
            if (1 << step) < CHUNK:
                if REVERSE:
                    has_source = position + (1 << step) < CHUNK
                    source = tl.where(has_source, rows + (1 << step), rows)
                else:
                    has_source = position >= (1 << step)
                    source = tl.where(has_source, rows - (1 << step), rows)
                index = source[:, None] + broadcast
                gate_source = tl.gather(gate, index, 0)
                shift_source = tl.gather(shift, index, 0)
                if REVERSE:
                    shift = tl.where(has_source[:, None], shift + gate * shift_source, shift)
                else:
                    shift = tl.where(has_source[:, None], shift_source * gate + shift, shift)
                gate = tl.where(has_source[:, None], gate * gate_source, gate)
        return shift


@triton.jit
def _gated_scan(x, g, restart, CHUNK: tl.constexpr):
    """state_t = g_t*state_{t-1} + (1-g_t)*x_t down the rows of a tile, from zero where `restart`."""
    return _chunk_linear_scan(tl.where(restart[:, None], 0.0, g), (1.0 - g) * x, CHUNK, False)


@triton.jit
def _reverse_gated_scan(grad, next_gate, CHUNK: tl.constexpr):
    """lambda_t = grad_t + next_gate_t*lambda_{t+1} up the rows (next_gate is 0 where a chunk ends)."""
    return _chunk_linear_scan(next_gate, grad, CHUNK, True)


@triton.jit
def _load_halves(base, rows, row_stride, mask, HALF: tl.constexpr):
    """The (lo, hi) halves of the rows `rows` of a [*, 2*HALF] tile, as fp32; zero where not `mask`."""
    ptrs = base + rows[:, None].to(tl.int64) * row_stride + tl.arange(0, HALF)[None, :]  # T*stride may pass 2^31
    lo = tl.load(ptrs, mask=mask[:, None], other=0.0).to(tl.float32)
    hi = tl.load(ptrs + HALF, mask=mask[:, None], other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def _store_halves(base, rows, row_stride, mask, lo, hi, HALF: tl.constexpr):
    """Store (lo, hi) halves as the rows `rows` of a [*, 2*HALF] tile, in the buffer's dtype."""
    ptrs = base + rows[:, None].to(tl.int64) * row_stride + tl.arange(0, HALF)[None, :]  # T*stride may pass 2^31
    tl.store(ptrs, lo.to(base.dtype.element_ty), mask=mask[:, None])
    tl.store(ptrs + HALF, hi.to(base.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _load_angles(cos_ptr, sin_ptr, chunk, mask, HALF: tl.constexpr):
    """cos and sin [rows, HALF] of each row's chunk, from the [C, HALF] tables."""
    offsets = chunk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + offsets, mask=mask[:, None], other=1.0)
    sin = tl.load(sin_ptr + offsets, mask=mask[:, None], other=0.0)
    return cos, sin


@triton.jit
def _rotate(lo, hi, cos, sin):
    return lo * cos - hi * sin, hi * cos + lo * sin


@triton.jit
def _unrotate(lo, hi, cos, sin):
    """The transpose (inverse) rotation: how a gradient goes back through RoPE."""
    return lo * cos + hi * sin, hi * cos - lo * sin


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b in fp32: exact-fp32 products for fp32 inputs, tensor-core products in fp16/bf16 otherwise."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _states_and_previous(k_base, v_base, g_base, k_st, v_st, g_st, rows, valid, CHUNK: tl.constexpr,
                         HALF: tl.constexpr):
    """Running states of k and v one token before each row (zero at a chunk's first token), as halves.

    The scan runs over the inputs shifted down one row: the backward needs the state before each
    token (for dg), and the state at the token is then one multiply-add, not a second scan.
    """
    restart = rows % CHUNK == 0
    after_restart = (rows - 1) % CHUNK == 0
    has_previous = valid & ~restart
    g_prev_lo, g_prev_hi = _load_halves(g_base, rows - 1, g_st, has_previous, HALF)
    k_prev_lo, k_prev_hi = _load_halves(k_base, rows - 1, k_st, has_previous, HALF)
    v_prev_lo, v_prev_hi = _load_halves(v_base, rows - 1, v_st, has_previous, HALF)
    ks_prev_lo = _gated_scan(k_prev_lo, g_prev_lo, after_restart, CHUNK)
    ks_prev_hi = _gated_scan(k_prev_hi, g_prev_hi, after_restart, CHUNK)
    vs_prev_lo = _gated_scan(v_prev_lo, g_prev_lo, after_restart, CHUNK)
    vs_prev_hi = _gated_scan(v_prev_hi, g_prev_hi, after_restart, CHUNK)
    return ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi


@triton.jit
def _states_backward(
    dks_lo, dks_hi, dvs_lo, dvs_hi, ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi,
    k_lo, k_hi, v_lo, v_hi, g_lo, g_hi, g_base, g_st, rows, valid, T,
    dk_base, dv_base, dg_base, out_st, CHUNK: tl.constexpr, HALF: tl.constexpr,
):
    """Store dk, dv, dg given the gradients dstate_t reaching each running state (un-rotated).

    With state_t = g_t*state_{t-1} + (1-g_t)*x_t, the total gradient of state_t is the reverse scan
    lambda_t = dstate_t + g_{t+1}*lambda_{t+1} within a chunk; then dx_t = (1-g_t)*lambda_t and
    dg_t = sum over the k and v streams of lambda_t*(state_{t-1} - x_t).
    """
    next_rows = rows + 1
    next_in_chunk = (next_rows < T) & (next_rows % CHUNK != 0)
    g_next_lo, g_next_hi = _load_halves(g_base, next_rows, g_st, next_in_chunk, HALF)
    lam_k_lo = _reverse_gated_scan(dks_lo, g_next_lo, CHUNK)
    lam_k_hi = _reverse_gated_scan(dks_hi, g_next_hi, CHUNK)
    lam_v_lo = _reverse_gated_scan(dvs_lo, g_next_lo, CHUNK)
    lam_v_hi = _reverse_gated_scan(dvs_hi, g_next_hi, CHUNK)
    _store_halves(dk_base, rows, out_st, valid, (1.0 - g_lo) * lam_k_lo, (1.0 - g_hi) * lam_k_hi, HALF)
    _store_halves(dv_base, rows, out_st, valid, (1.0 - g_lo) * lam_v_lo, (1.0 - g_hi) * lam_v_hi, HALF)
    dg_lo = lam_k_lo * (ks_prev_lo - k_lo) + lam_v_lo * (vs_prev_lo - v_lo)
    dg_hi = lam_k_hi * (ks_prev_hi - k_hi) + lam_v_hi * (vs_prev_hi - v_hi)
    _store_halves(dg_base, rows, out_st, valid, dg_lo, dg_hi, HALF)


# --------------------------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _summaries_kernel(
    k_ptr, v_ptr, g_ptr, k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh,
    cos_ptr, sin_ptr, sum_k_ptr, sum_v_ptr,
    T, H, num_prefix, num_summaries,
    CHUNK: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    """Final states of the chunks in a tile of BLOCK_M tokens, k rotated by its chunk, into the summary buffer.

    A partial last chunk writes its state at token T-1 too (never read, but no element stays unwritten).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < T
    restart = rows % CHUNK == 0
    g_lo, g_hi = _load_halves(g_ptr + b * g_sb + h * g_sh, rows, g_st, valid, HALF)
    k_lo, k_hi = _load_halves(k_ptr + b * k_sb + h * k_sh, rows, k_st, valid, HALF)
    v_lo, v_hi = _load_halves(v_ptr + b * v_sb + h * v_sh, rows, v_st, valid, HALF)
    ks_lo = _gated_scan(k_lo, g_lo, restart, CHUNK)
    ks_hi = _gated_scan(k_hi, g_hi, restart, CHUNK)
    vs_lo = _gated_scan(v_lo, g_lo, restart, CHUNK)
    vs_hi = _gated_scan(v_hi, g_hi, restart, CHUNK)
    chunk = rows // CHUNK
    is_last = valid & ((rows % CHUNK == CHUNK - 1) | (rows == T - 1))
    if HAS_ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, chunk, is_last, HALF)
        ks_lo, ks_hi = _rotate(ks_lo, ks_hi, cos, sin)
    summary_offset = (b * H + h) * num_summaries * 2 * HALF
    slots = num_prefix + chunk
    _store_halves(sum_k_ptr + summary_offset, slots, 2 * HALF, is_last, ks_lo, ks_hi, HALF)
    _store_halves(sum_v_ptr + summary_offset, slots, 2 * HALF, is_last, vs_lo, vs_hi, HALF)


@triton.jit
def _forward_summary_tile(
    q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, sum_k, sum_v, n_start, visible_start, visible_end, load_end, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOCUMENTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One online-softmax step over summaries [n_start, n_start + BLOCK_N); MASKED applies the block-causal mask
    (and, with DOCUMENTS, hides the summaries before each row's document, from `visible_start` down)."""
    slots = n_start + tl.arange(0, BLOCK_N)
    sk_lo, sk_hi = _load_halves(sum_k, slots, 2 * HALF, slots < load_end, HALF)
    sv_lo, sv_hi = _load_halves(sum_v, slots, 2 * HALF, slots < load_end, HALF)
    scores = (_dot(q_lo, tl.trans(sk_lo), DOT_DTYPE) + _dot(q_hi, tl.trans(sk_hi), DOT_DTYPE)) * scale
    if MASKED:
        visible = slots[None, :] < visible_end[:, None]
        if DOCUMENTS:
            visible = visible & (slots[None, :] >= visible_start[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    probs = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(probs, 1)
    acc_lo = acc_lo * alpha[:, None] + _dot(probs, sv_lo, DOT_DTYPE)
    acc_hi = acc_hi * alpha[:, None] + _dot(probs, sv_hi, DOT_DTYPE)
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _document_summary_tiles(doc_first_ptr, chunk, valid, first_chunk, last_chunk, seen_by_some_end,
                            BLOCK_N: tl.constexpr):
    """With documents, for a query tile of chunks first_chunk..last_chunk: each row's first visible summary
    (its document's first chunk), the first summary tile any row sees, and where the tiles every row sees
    in full begin (past the last row's document start; `seen_by_some_end` if none)."""
    visible_start = tl.load(doc_first_ptr + chunk, mask=valid, other=0)
    seen_by_some_start = tl.load(doc_first_ptr + first_chunk) // BLOCK_N * BLOCK_N
    seen_by_all_start = tl.cdiv(tl.load(doc_first_ptr + last_chunk), BLOCK_N) * BLOCK_N
    return visible_start, seen_by_some_start, tl.minimum(seen_by_all_start, seen_by_some_end)


@triton.autotune(configs=pinned_configs(_QUERY_TILE_CONFIGS), key=["CHUNK", "HALF", "HAS_ROPE", "DOCUMENTS"])
@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh,
    cos_ptr, sin_ptr, doc_first_ptr, sum_k_ptr, sum_v_ptr, out_ptr, lse_ptr,
    T, H, num_prefix, num_summaries, scale,
    CHUNK: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr, DOCUMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """RAT output and lse for BLOCK_M tokens (whole chunks) of one (batch, head).

    Summary tiles every row sees run unmasked; the last few, which reach into the tile's own
    chunks, are masked per row; tiles no row sees are never loaded. With DOCUMENTS (realigned
    documents, no prefix), summary s is visible to chunk c only when doc_first[c] <= s < c: the
    tiles before the tile's first document are skipped and those reaching before its last
    document's start are masked too.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DOT_DTYPE = q_ptr.dtype.element_ty  # tensor-core dots in q's dtype
    row_start = pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    valid = rows < T
    chunk = rows // CHUNK

    q_lo, q_hi = _load_halves(q_ptr + b * q_sb + h * q_sh, rows, q_st, valid, HALF)
    if HAS_ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, chunk, valid, HALF)
        q_lo, q_hi = _rotate(q_lo, q_hi, cos, sin)

    summary_offset = (b * H + h) * num_summaries * 2 * HALF
    sum_k = sum_k_ptr + summary_offset
    sum_v = sum_v_ptr + summary_offset
    # A finite floor instead of -inf keeps exp(m_old - m_new) defined for rows that see nothing yet.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    first_chunk = row_start // CHUNK
    last_chunk = (tl.minimum(row_start + BLOCK_M, T) - 1) // CHUNK
    visible_end = num_prefix + chunk
    seen_by_all_end = (num_prefix + first_chunk) // BLOCK_N * BLOCK_N
    seen_by_some_end = num_prefix + last_chunk
    visible_start = visible_end  # read only with DOCUMENTS
    seen_by_all_start = 0
    if DOCUMENTS:
        visible_start, seen_by_some_start, seen_by_all_start = _document_summary_tiles(
            doc_first_ptr, chunk, valid, first_chunk, last_chunk, seen_by_some_end, BLOCK_N
        )
        seen_by_all_end = tl.maximum(seen_by_all_end, seen_by_all_start)
        for n_start in range(seen_by_some_start, seen_by_all_start, BLOCK_N):
            m_i, l_i, acc_lo, acc_hi = _forward_summary_tile(
                q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, sum_k, sum_v, n_start, visible_start, visible_end,
                seen_by_some_end, scale, HALF, BLOCK_N, True, DOCUMENTS, DOT_DTYPE,
            )
    for n_start in range(seen_by_all_start, seen_by_all_end, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _forward_summary_tile(
            q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, sum_k, sum_v, n_start, visible_start, visible_end,
            seen_by_some_end, scale, HALF, BLOCK_N, False, DOCUMENTS, DOT_DTYPE,
        )
    for n_start in range(seen_by_all_end, seen_by_some_end, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _forward_summary_tile(
            q_lo, q_hi, m_i, l_i, acc_lo, acc_hi, sum_k, sum_v, n_start, visible_start, visible_end,
            seen_by_some_end, scale, HALF, BLOCK_N, True, DOCUMENTS, DOT_DTYPE,
        )

    # Epilogue: the token's own running state, one more term of the same softmax.
    restart = rows % CHUNK == 0
    g_lo, g_hi = _load_halves(g_ptr + b * g_sb + h * g_sh, rows, g_st, valid, HALF)
    k_lo, k_hi = _load_halves(k_ptr + b * k_sb + h * k_sh, rows, k_st, valid, HALF)
    ks_lo = _gated_scan(k_lo, g_lo, restart, CHUNK)
    ks_hi = _gated_scan(k_hi, g_hi, restart, CHUNK)
    if HAS_ROPE:
        ks_lo, ks_hi = _rotate(ks_lo, ks_hi, cos, sin)
    own_score = tl.sum(q_lo * ks_lo + q_hi * ks_hi, 1) * scale
    m_new = tl.maximum(m_i, own_score)
    alpha = tl.exp(m_i - m_new)
    own_prob = tl.exp(own_score - m_new)
    l_i = l_i * alpha + own_prob
    v_lo, v_hi = _load_halves(v_ptr + b * v_sb + h * v_sh, rows, v_st, valid, HALF)
    vs_lo = _gated_scan(v_lo, g_lo, restart, CHUNK)
    vs_hi = _gated_scan(v_hi, g_hi, restart, CHUNK)
    out_lo = (acc_lo * alpha[:, None] + own_prob[:, None] * vs_lo) / l_i[:, None]
    out_hi = (acc_hi * alpha[:, None] + own_prob[:, None] * vs_hi) / l_i[:, None]

    out_st = H * 2 * HALF
    _store_halves(out_ptr + b * T * out_st + h * 2 * HALF, rows, out_st, valid, out_lo, out_hi, HALF)
    tl.store(lse_ptr + (b * H + h) * T + rows, m_new + tl.log(l_i), mask=valid)


# --------------------------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------------------------- #
@triton.jit
def _delta_kernel(
    out_ptr, do_ptr, do_sb, do_st, do_sh, delta_ptr, T, H,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_t = sum_d dO_t * o_t for BLOCK_M tokens of one (batch, head): the softmax-backward row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < T
    cols = tl.arange(0, HEAD_DIM)
    rows_64 = rows[:, None].to(tl.int64)
    out_ptrs = out_ptr + b * T * H * HEAD_DIM + h * HEAD_DIM + rows_64 * H * HEAD_DIM + cols[None, :]
    do_ptrs = do_ptr + b * do_sb + h * do_sh + rows_64 * do_st + cols[None, :]
    out = tl.load(out_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    grad_out = tl.load(do_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + (b * H + h) * T + rows, tl.sum(out * grad_out, 1), mask=valid)


@triton.jit
def _summary_grads_query_tile(
    sk_lo, sk_hi, sv_lo, sv_hi, dsk_lo, dsk_hi, dsv_lo, dsv_hi, slots,
    q_base, q_st, do_base, do_st, lse_base, delta_base, cos_ptr, sin_ptr, doc_first_ptr,
    row_start, T, num_prefix, scale,
    CHUNK: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ROPE: tl.constexpr,
    MASKED: tl.constexpr, DOCUMENTS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Add one query tile's contribution to the gradients of a tile of summaries (rotated frame, unscaled).

    MASKED applies the block-causal mask and, with DOCUMENTS, hides the summaries before each row's document.
    """
    rows = row_start + tl.arange(0, BLOCK_M)
    valid = rows < T
    chunk = rows // CHUNK
    q_lo, q_hi = _load_halves(q_base, rows, q_st, valid, HALF)
    if HAS_ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, chunk, valid, HALF)
        q_lo, q_hi = _rotate(q_lo, q_hi, cos, sin)
    do_lo, do_hi = _load_halves(do_base, rows, do_st, valid, HALF)
    lse = tl.load(lse_base + rows, mask=valid, other=0.0)
    delta = tl.load(delta_base + rows, mask=valid, other=0.0)
    scores = (_dot(q_lo, tl.trans(sk_lo), DOT_DTYPE) + _dot(q_hi, tl.trans(sk_hi), DOT_DTYPE)) * scale
    seen = valid[:, None]
    if MASKED:
        seen = seen & (slots[None, :] < num_prefix + chunk[:, None])
        if DOCUMENTS:
            visible_start = tl.load(doc_first_ptr + chunk, mask=valid, other=0)
            seen = seen & (slots[None, :] >= visible_start[:, None])
    probs = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
    dprobs = _dot(do_lo, tl.trans(sv_lo), DOT_DTYPE) + _dot(do_hi, tl.trans(sv_hi), DOT_DTYPE)
    dscores = probs * (dprobs - delta[:, None])
    dsv_lo += _dot(tl.trans(probs), do_lo, DOT_DTYPE)
    dsv_hi += _dot(tl.trans(probs), do_hi, DOT_DTYPE)
    dsk_lo += _dot(tl.trans(dscores), q_lo, DOT_DTYPE)
    dsk_hi += _dot(tl.trans(dscores), q_hi, DOT_DTYPE)
    return dsk_lo, dsk_hi, dsv_lo, dsv_hi


@triton.autotune(configs=pinned_configs(_SUMMARY_TILE_CONFIGS), key=["CHUNK", "HALF", "HAS_ROPE", "DOCUMENTS"])
@triton.jit
def _summary_grads_kernel(
    q_ptr, q_sb, q_st, q_sh, do_ptr, do_sb, do_st, do_sh, lse_ptr, delta_ptr,
    cos_ptr, sin_ptr, doc_first_ptr, doc_end_ptr, sum_k_ptr, sum_v_ptr, dsum_k_ptr, dsum_v_ptr,
    T, H, num_prefix, num_summaries, scale,
    CHUNK: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr, DOCUMENTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Gradients of BLOCK_N summaries of one (batch, head), in the rotated frame they were attended in.

    Summary s is seen by the tokens of chunks c > s - P: the query tiles from there to T, the first
    ones masked per row, the rest (every row sees every summary of the tile) unmasked. A summary
    no token sees (the last local one) gets an exact zero. With DOCUMENTS (no prefix), only the
    chunks of s's own document see it: the query tiles stop at the last slot's document's end
    (doc_end), and those past the first slot's document are masked.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DOT_DTYPE = q_ptr.dtype.element_ty  # tensor-core dots in q's dtype
    n_start = pid_n * BLOCK_N
    slots = n_start + tl.arange(0, BLOCK_N)
    slot_valid = slots < num_summaries
    summary_offset = (b * H + h) * num_summaries * 2 * HALF
    sk_lo, sk_hi = _load_halves(sum_k_ptr + summary_offset, slots, 2 * HALF, slot_valid, HALF)
    sv_lo, sv_hi = _load_halves(sum_v_ptr + summary_offset, slots, 2 * HALF, slot_valid, HALF)
    dsk_lo = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dsk_hi = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dsv_lo = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dsv_hi = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)

    q_base = q_ptr + b * q_sb + h * q_sh
    do_base = do_ptr + b * do_sb + h * do_sh
    lse_base = lse_ptr + (b * H + h) * T
    delta_base = delta_ptr + (b * H + h) * T
    # Rows from the first chunk that sees slot n_start; all rows from the first chunk that sees the last slot.
    first_row = tl.maximum(n_start - num_prefix + 1, 0) * CHUNK
    all_seen_row = tl.maximum(n_start + BLOCK_N - num_prefix, 0) * CHUNK
    masked_end = first_row + tl.cdiv(tl.maximum(all_seen_row - first_row, 0), BLOCK_M) * BLOCK_M
    masked_end = tl.minimum(masked_end, T)
    all_seen_end = T
    if DOCUMENTS:
        last_slot = tl.minimum(n_start + BLOCK_N, num_summaries) - 1
        seen_end = tl.minimum(tl.load(doc_end_ptr + last_slot) * CHUNK, T)
        masked_end = tl.minimum(masked_end, seen_end)
        # Whole query tiles up to the first slot's document end see every slot; to T, the partial last tile too.
        first_document_end = tl.load(doc_end_ptr + n_start) * CHUNK
        full_tiles = tl.maximum(first_document_end - masked_end, 0) // BLOCK_M
        all_seen_end = tl.where(first_document_end < T, masked_end + full_tiles * BLOCK_M, T)
    for row_start in range(first_row, masked_end, BLOCK_M):
        dsk_lo, dsk_hi, dsv_lo, dsv_hi = _summary_grads_query_tile(
            sk_lo, sk_hi, sv_lo, sv_hi, dsk_lo, dsk_hi, dsv_lo, dsv_hi, slots,
            q_base, q_st, do_base, do_st, lse_base, delta_base, cos_ptr, sin_ptr, doc_first_ptr,
            row_start, T, num_prefix, scale, CHUNK, HALF, BLOCK_M, HAS_ROPE, True, DOCUMENTS, DOT_DTYPE,
        )
    for row_start in range(masked_end, all_seen_end, BLOCK_M):
        dsk_lo, dsk_hi, dsv_lo, dsv_hi = _summary_grads_query_tile(
            sk_lo, sk_hi, sv_lo, sv_hi, dsk_lo, dsk_hi, dsv_lo, dsv_hi, slots,
            q_base, q_st, do_base, do_st, lse_base, delta_base, cos_ptr, sin_ptr, doc_first_ptr,
            row_start, T, num_prefix, scale, CHUNK, HALF, BLOCK_M, HAS_ROPE, False, DOCUMENTS, DOT_DTYPE,
        )
    if DOCUMENTS:
        for row_start in range(all_seen_end, seen_end, BLOCK_M):
            dsk_lo, dsk_hi, dsv_lo, dsv_hi = _summary_grads_query_tile(
                sk_lo, sk_hi, sv_lo, sv_hi, dsk_lo, dsk_hi, dsv_lo, dsv_hi, slots,
                q_base, q_st, do_base, do_st, lse_base, delta_base, cos_ptr, sin_ptr, doc_first_ptr,
                row_start, T, num_prefix, scale, CHUNK, HALF, BLOCK_M, HAS_ROPE, True, DOCUMENTS, DOT_DTYPE,
            )
    _store_halves(dsum_k_ptr + summary_offset, slots, 2 * HALF, slot_valid, dsk_lo * scale, dsk_hi * scale, HALF)
    _store_halves(dsum_v_ptr + summary_offset, slots, 2 * HALF, slot_valid, dsv_lo, dsv_hi, HALF)


@triton.jit
def _query_grads_summary_tile(
    q_lo, q_hi, do_lo, do_hi, lse, delta, dq_lo, dq_hi, sum_k, sum_v, n_start, visible_start, visible_end,
    load_end, scale,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOCUMENTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Add one summary tile's term to dq (rotated frame, unscaled); masks as `_forward_summary_tile`."""
    slots = n_start + tl.arange(0, BLOCK_N)
    sk_lo, sk_hi = _load_halves(sum_k, slots, 2 * HALF, slots < load_end, HALF)
    sv_lo, sv_hi = _load_halves(sum_v, slots, 2 * HALF, slots < load_end, HALF)
    scores = (_dot(q_lo, tl.trans(sk_lo), DOT_DTYPE) + _dot(q_hi, tl.trans(sk_hi), DOT_DTYPE)) * scale
    probs = tl.exp(scores - lse[:, None])
    if MASKED:
        visible = slots[None, :] < visible_end[:, None]
        if DOCUMENTS:
            visible = visible & (slots[None, :] >= visible_start[:, None])
        probs = tl.where(visible, probs, 0.0)
    dprobs = _dot(do_lo, tl.trans(sv_lo), DOT_DTYPE) + _dot(do_hi, tl.trans(sv_hi), DOT_DTYPE)
    dscores = probs * (dprobs - delta[:, None])
    dq_lo += _dot(dscores, sk_lo, DOT_DTYPE)
    dq_hi += _dot(dscores, sk_hi, DOT_DTYPE)
    return dq_lo, dq_hi


@triton.autotune(configs=pinned_configs(_QUERY_TILE_CONFIGS), key=["CHUNK", "HALF", "HAS_ROPE", "DOCUMENTS"])
@triton.jit
def _query_grads_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh,
    do_ptr, do_sb, do_st, do_sh, lse_ptr, delta_ptr,
    cos_ptr, sin_ptr, doc_first_ptr, sum_k_ptr, sum_v_ptr, dsum_k_ptr, dsum_v_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr,
    T, H, num_prefix, num_summaries, scale,
    CHUNK: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr, DOCUMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq, dk, dv, dg for BLOCK_M tokens (whole chunks) of one (batch, head).

    The gradient reaching the running state k~_t, v~_t is the own-term softmax gradient plus, at a
    chunk's last token, the gradient of that chunk's summary (from `_summary_grads_kernel`); the
    reverse scan of `_states_backward` takes it to k, v and g. The summary tiles and masks are
    those of `_forward_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    DOT_DTYPE = q_ptr.dtype.element_ty  # tensor-core dots in q's dtype
    row_start = pid_m * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    valid = rows < T
    chunk = rows // CHUNK

    q_lo, q_hi = _load_halves(q_ptr + b * q_sb + h * q_sh, rows, q_st, valid, HALF)
    if HAS_ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, chunk, valid, HALF)
        q_lo, q_hi = _rotate(q_lo, q_hi, cos, sin)
    do_lo, do_hi = _load_halves(do_ptr + b * do_sb + h * do_sh, rows, do_st, valid, HALF)
    lse = tl.load(lse_ptr + (b * H + h) * T + rows, mask=valid, other=0.0)
    delta = tl.load(delta_ptr + (b * H + h) * T + rows, mask=valid, other=0.0)

    summary_offset = (b * H + h) * num_summaries * 2 * HALF
    sum_k = sum_k_ptr + summary_offset
    sum_v = sum_v_ptr + summary_offset
    dq_lo = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    first_chunk = row_start // CHUNK
    last_chunk = (tl.minimum(row_start + BLOCK_M, T) - 1) // CHUNK
    visible_end = num_prefix + chunk
    seen_by_all_end = (num_prefix + first_chunk) // BLOCK_N * BLOCK_N
    seen_by_some_end = num_prefix + last_chunk
    visible_start = visible_end  # read only with DOCUMENTS
    seen_by_all_start = 0
    if DOCUMENTS:
        visible_start, seen_by_some_start, seen_by_all_start = _document_summary_tiles(
            doc_first_ptr, chunk, valid, first_chunk, last_chunk, seen_by_some_end, BLOCK_N
        )
        seen_by_all_end = tl.maximum(seen_by_all_end, seen_by_all_start)
        for n_start in range(seen_by_some_start, seen_by_all_start, BLOCK_N):
            dq_lo, dq_hi = _query_grads_summary_tile(
                q_lo, q_hi, do_lo, do_hi, lse, delta, dq_lo, dq_hi, sum_k, sum_v, n_start, visible_start,
                visible_end, seen_by_some_end, scale, HALF, BLOCK_N, True, DOCUMENTS, DOT_DTYPE,
            )
    for n_start in range(seen_by_all_start, seen_by_all_end, BLOCK_N):
        dq_lo, dq_hi = _query_grads_summary_tile(
            q_lo, q_hi, do_lo, do_hi, lse, delta, dq_lo, dq_hi, sum_k, sum_v, n_start, visible_start,
            visible_end, seen_by_some_end, scale, HALF, BLOCK_N, False, DOCUMENTS, DOT_DTYPE,
        )
    for n_start in range(seen_by_all_end, seen_by_some_end, BLOCK_N):
        dq_lo, dq_hi = _query_grads_summary_tile(
            q_lo, q_hi, do_lo, do_hi, lse, delta, dq_lo, dq_hi, sum_k, sum_v, n_start, visible_start,
            visible_end, seen_by_some_end, scale, HALF, BLOCK_N, True, DOCUMENTS, DOT_DTYPE,
        )

    # The own term: recompute the running states (and those one token earlier, for dg).
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    g_base = g_ptr + b * g_sb + h * g_sh
    ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi = _states_and_previous(
        k_base, v_base, g_base, k_st, v_st, g_st, rows, valid, CHUNK, HALF
    )
    g_lo, g_hi = _load_halves(g_base, rows, g_st, valid, HALF)
    k_lo, k_hi = _load_halves(k_base, rows, k_st, valid, HALF)
    ks_lo = g_lo * ks_prev_lo + (1.0 - g_lo) * k_lo
    ks_hi = g_hi * ks_prev_hi + (1.0 - g_hi) * k_hi
    if HAS_ROPE:
        ks_lo, ks_hi = _rotate(ks_lo, ks_hi, cos, sin)
    own_score = tl.sum(q_lo * ks_lo + q_hi * ks_hi, 1) * scale
    own_prob = tl.where(valid, tl.exp(own_score - lse), 0.0)
    v_lo, v_hi = _load_halves(v_base, rows, v_st, valid, HALF)
    vs_lo = g_lo * vs_prev_lo + (1.0 - g_lo) * v_lo
    vs_hi = g_hi * vs_prev_hi + (1.0 - g_hi) * v_hi
    own_dscore = own_prob * (tl.sum(do_lo * vs_lo + do_hi * vs_hi, 1) - delta)

    dq_lo = (dq_lo + own_dscore[:, None] * ks_lo) * scale
    dq_hi = (dq_hi + own_dscore[:, None] * ks_hi) * scale
    if HAS_ROPE:
        dq_lo, dq_hi = _unrotate(dq_lo, dq_hi, cos, sin)
    out_st = H * 2 * HALF
    out_offset = b * T * out_st + h * 2 * HALF
    _store_halves(dq_ptr + out_offset, rows, out_st, valid, dq_lo, dq_hi, HALF)

    # Gradients reaching the states: own term, plus the summary's at each chunk's last token.
    ends_chunk = valid & (rows % CHUNK == CHUNK - 1)
    dsk_lo, dsk_hi = _load_halves(dsum_k_ptr + summary_offset, num_prefix + chunk, 2 * HALF, ends_chunk, HALF)
    dks_lo = own_dscore[:, None] * q_lo * scale + dsk_lo
    dks_hi = own_dscore[:, None] * q_hi * scale + dsk_hi
    if HAS_ROPE:
        dks_lo, dks_hi = _unrotate(dks_lo, dks_hi, cos, sin)
    dsv_lo, dsv_hi = _load_halves(dsum_v_ptr + summary_offset, num_prefix + chunk, 2 * HALF, ends_chunk, HALF)
    dvs_lo = own_prob[:, None] * do_lo + dsv_lo
    dvs_hi = own_prob[:, None] * do_hi + dsv_hi

    _states_backward(
        dks_lo, dks_hi, dvs_lo, dvs_hi, ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi,
        k_lo, k_hi, v_lo, v_hi, g_lo, g_hi, g_base, g_st, rows, valid, T,
        dk_ptr + out_offset, dv_ptr + out_offset, dg_ptr + out_offset, out_st, CHUNK, HALF,
    )


@triton.jit
def _chunk_summary_grads_kernel(
    k_ptr, v_ptr, g_ptr, k_sb, k_st, k_sh, v_sb, v_st, v_sh, g_sb, g_st, g_sh,
    cos_ptr, sin_ptr, dsum_k_ptr, dsum_v_ptr, dk_ptr, dv_ptr, dg_ptr,
    T, H, num_full_chunks,
    CHUNK: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    """dk, dv, dg of `chunk_summaries` for BLOCK_M tokens (whole chunks): gradient enters at each chunk's last token."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < T
    chunk = rows // CHUNK
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    g_base = g_ptr + b * g_sb + h * g_sh
    ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi = _states_and_previous(
        k_base, v_base, g_base, k_st, v_st, g_st, rows, valid, CHUNK, HALF
    )
    g_lo, g_hi = _load_halves(g_base, rows, g_st, valid, HALF)
    k_lo, k_hi = _load_halves(k_base, rows, k_st, valid, HALF)
    v_lo, v_hi = _load_halves(v_base, rows, v_st, valid, HALF)

    ends_chunk = valid & (rows % CHUNK == CHUNK - 1)  # inside T, so a full chunk
    summary_offset = (b * H + h) * num_full_chunks * 2 * HALF
    dks_lo, dks_hi = _load_halves(dsum_k_ptr + summary_offset, chunk, 2 * HALF, ends_chunk, HALF)
    if HAS_ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, chunk, ends_chunk, HALF)
        dks_lo, dks_hi = _unrotate(dks_lo, dks_hi, cos, sin)
    dvs_lo, dvs_hi = _load_halves(dsum_v_ptr + summary_offset, chunk, 2 * HALF, ends_chunk, HALF)
    out_st = H * 2 * HALF
    out_offset = b * T * out_st + h * 2 * HALF
    _states_backward(
        dks_lo, dks_hi, dvs_lo, dvs_hi, ks_prev_lo, ks_prev_hi, vs_prev_lo, vs_prev_hi,
        k_lo, k_hi, v_lo, v_hi, g_lo, g_hi, g_base, g_st, rows, valid, T,
        dk_ptr + out_offset, dv_ptr + out_offset, dg_ptr + out_offset, out_st, CHUNK, HALF,
    )


# --------------------------------------------------------------------------------------------- #
# Host side
# --------------------------------------------------------------------------------------------- #
def _bth_strides(x: Tensor) -> tuple[int, int, int]:
    """Batch, time and head strides of a [B, T, H, D] tensor (the last dim is contiguous)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _angle_tables(chunk_index: Tensor, head_dim: int, rope_base: float | None):
    """fp32 cos/sin [C, D/2] of each chunk's rotation index `[C]`, computed in float64 like the reference."""
    if rope_base is None:
        dummy = torch.empty(1, dtype=torch.float32, device=chunk_index.device)
        return dummy, dummy
    cos, sin = rope_angles(chunk_index, head_dim, rope_base)
    return cos.float().contiguous(), sin.float().contiguous()


class _RatFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, prefix_k, prefix_v, chunk_size, rope_base, chunk_index, document_first_chunk,
                document_end_chunk):
        # chunk_index [C]: the rotation of each chunk. document_first_chunk / document_end_chunk [C] int32 (or
        # None): the chunks of each chunk's document, for realigned documents (no prefix then).
        batch, seq_len, heads, head_dim = q.shape
        num_chunks = triton.cdiv(seq_len, chunk_size)
        num_prefix = prefix_k.shape[1]
        num_summaries = num_prefix + num_chunks
        cos, sin = _angle_tables(chunk_index, head_dim, rope_base)
        documents = document_first_chunk is not None
        if not documents:  # the kernels take a pointer either way, and read it only with DOCUMENTS
            document_first_chunk = document_end_chunk = chunk_index

        summary_shape = (batch, heads, num_summaries, head_dim)
        sum_k = new_output(summary_shape, like=q, dtype=torch.float32)
        sum_v = new_output(summary_shape, like=q, dtype=torch.float32)
        sum_k[:, :, :num_prefix] = prefix_k.transpose(1, 2)  # small: one row per chunk
        sum_v[:, :, :num_prefix] = prefix_v.transpose(1, 2)
        out = new_output((batch, seq_len, heads, head_dim), like=v)
        lse = new_output((batch, heads, seq_len), like=q, dtype=torch.float32)
        half = head_dim // 2
        has_rope = rope_base is not None
        _summaries_kernel[(triton.cdiv(seq_len, _SCAN_BLOCK_M), batch * heads)](
            k, v, g, *_bth_strides(k), *_bth_strides(v), *_bth_strides(g), cos, sin, sum_k, sum_v,
            seq_len, heads, num_prefix, num_summaries,
            CHUNK=chunk_size, HALF=half, BLOCK_M=_SCAN_BLOCK_M, HAS_ROPE=has_rope,
        )
        grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _forward_kernel[grid](
            q, k, v, g, *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(g),
            cos, sin, document_first_chunk, sum_k, sum_v, out, lse,
            seq_len, heads, num_prefix, num_summaries, head_dim**-0.5,
            CHUNK=chunk_size, HALF=half, HAS_ROPE=has_rope, DOCUMENTS=documents,
        )
        ctx.save_for_backward(q, k, v, g, out, lse, sum_k, sum_v, cos, sin, document_first_chunk, document_end_chunk)
        ctx.chunk_size, ctx.has_rope, ctx.num_prefix, ctx.documents = chunk_size, has_rope, num_prefix, documents
        ctx.prefix_dtypes = (prefix_k.dtype, prefix_v.dtype)
        ctx.set_materialize_grads(False)  # lse and the summaries are often not used: no zero gradients for them
        # The complete local chunks' summaries, in the compute dtype as chunk_summaries returns them.
        compute_dtype = torch.promote_types(k.dtype, g.dtype)
        local = slice(num_prefix, num_prefix + seq_len // chunk_size)
        summary_k = sum_k[:, :, local].transpose(1, 2).to(compute_dtype, copy=True)
        summary_v = sum_v[:, :, local].transpose(1, 2).to(compute_dtype, copy=True)
        return out, lse.clone(), summary_k, summary_v

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_summary_k, grad_summary_v):
        q, k, v, g, out, lse, sum_k, sum_v, cos, sin, document_first_chunk, document_end_chunk = ctx.saved_tensors
        batch, seq_len, heads, head_dim = q.shape
        num_prefix, num_summaries = ctx.num_prefix, sum_k.shape[2]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        common = dict(CHUNK=ctx.chunk_size, HALF=head_dim // 2, HAS_ROPE=ctx.has_rope, DOCUMENTS=ctx.documents)
        scale = head_dim**-0.5

        delta = new_output((batch, heads, seq_len), like=q, dtype=torch.float32)
        _delta_kernel[(triton.cdiv(seq_len, _SCAN_BLOCK_M), batch * heads)](
            out, grad_out, *_bth_strides(grad_out), delta, seq_len, heads, HEAD_DIM=head_dim, BLOCK_M=_SCAN_BLOCK_M,
        )
        if grad_lse is not None:
            # d lse / d score = the probability, so an lse gradient joins dO . o in the row term.
            delta -= grad_lse.float()
        dsum_k = new_output(sum_k.shape, like=sum_k)
        dsum_v = new_output(sum_v.shape, like=sum_v)
        _summary_grads_kernel[lambda meta: (triton.cdiv(num_summaries, meta["BLOCK_N"]), batch * heads)](
            q, *_bth_strides(q), grad_out, *_bth_strides(grad_out), lse, delta,
            cos, sin, document_first_chunk, document_end_chunk, sum_k, sum_v, dsum_k, dsum_v,
            seq_len, heads, num_prefix, num_summaries, scale, **common,
        )
        # Summaries returned to the caller get their gradient there too; the query-grads kernel
        # takes each chunk's total summary gradient back through the scan.
        local = slice(num_prefix, num_prefix + seq_len // ctx.chunk_size)
        if grad_summary_k is not None:
            dsum_k[:, :, local] += grad_summary_k.transpose(1, 2)
        if grad_summary_v is not None:
            dsum_v[:, :, local] += grad_summary_v.transpose(1, 2)
        dq = new_output(q.shape, like=q)
        dk = new_output(k.shape, like=k)
        dv = new_output(v.shape, like=v)
        dg = new_output(g.shape, like=g)
        _query_grads_kernel[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)](
            q, k, v, g, *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(g),
            grad_out, *_bth_strides(grad_out), lse, delta,
            cos, sin, document_first_chunk, sum_k, sum_v, dsum_k, dsum_v, dq, dk, dv, dg,
            seq_len, heads, num_prefix, num_summaries, scale, **common,
        )
        dprefix_k = dsum_k[:, :, :num_prefix].transpose(1, 2).to(ctx.prefix_dtypes[0])
        dprefix_v = dsum_v[:, :, :num_prefix].transpose(1, 2).to(ctx.prefix_dtypes[1])
        return dq, dk, dv, dg, dprefix_k, dprefix_v, None, None, None, None, None


def rat_triton(
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
    """(out, lse, summary keys, summary values) with fused Triton kernels; inputs already checked by `kernels.rat`."""
    if prefix_k is None:
        batch, _, heads, head_dim = k.shape
        prefix_k = prefix_v = k.new_empty(batch, 0, heads, head_dim)
    chunk_index = torch.arange(chunk_start, chunk_start + triton.cdiv(q.shape[1], chunk_size), device=q.device)
    return _RatFunction.apply(q, k, v, g, prefix_k, prefix_v, chunk_size, rope_base, chunk_index, None, None)


def rat_documents_triton(
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
    """`documents.rat_documents` with the fused kernels, on the documents realigned to the chunk grid (realign.py).

    Inputs already checked by `kernels.rat`. One host sync (the realigned length).
    """
    batch, _, heads, head_dim = q.shape
    realignment = realign_documents(segment_ids, chunk_size, document_offset)
    carry_k, carry_v = (None, None) if initial_state is None else initial_state
    realigned_k = to_realigned(k, realignment, carry_k)
    no_prefix = realigned_k.new_empty(1, 0, heads, head_dim)
    out, lse, summary_k, summary_v = _RatFunction.apply(
        to_realigned(q, realignment), realigned_k, to_realigned(v, realignment, carry_v), to_realigned(g, realignment),
        no_prefix, no_prefix, chunk_size, rope_base, realignment.chunk_index,
        realignment.document_first_chunk, realignment.document_end_chunk,
    )
    # rat_documents' summaries are in promote(q, g), whatever a carried state promoted k and v to.
    summary_dtype = torch.promote_types(q.dtype, g.dtype)
    return (
        from_realigned(out, realignment, batch).to(v.dtype),
        lse_from_realigned(lse, realignment, batch),
        summaries_from_realigned(summary_k, realignment).to(summary_dtype),
        summaries_from_realigned(summary_v, realignment).to(summary_dtype),
    )


class _ChunkSummariesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, g, chunk_size, rope_base, chunk_start):
        batch, seq_len, heads, head_dim = k.shape
        num_chunks = triton.cdiv(seq_len, chunk_size)  # the partial last one is computed, then dropped
        num_full_chunks = seq_len // chunk_size
        chunk_index = torch.arange(chunk_start, chunk_start + num_chunks, device=k.device)
        cos, sin = _angle_tables(chunk_index, head_dim, rope_base)
        sum_k = new_output((batch, heads, num_chunks, head_dim), like=k, dtype=torch.float32)
        sum_v = new_output((batch, heads, num_chunks, head_dim), like=k, dtype=torch.float32)
        _summaries_kernel[(triton.cdiv(seq_len, _SCAN_BLOCK_M), batch * heads)](
            k, v, g, *_bth_strides(k), *_bth_strides(v), *_bth_strides(g), cos, sin, sum_k, sum_v,
            seq_len, heads, 0, num_chunks,
            CHUNK=chunk_size, HALF=head_dim // 2, BLOCK_M=_SCAN_BLOCK_M, HAS_ROPE=rope_base is not None,
        )
        ctx.save_for_backward(k, v, g, cos, sin)
        ctx.chunk_size, ctx.has_rope = chunk_size, rope_base is not None
        compute_dtype = torch.promote_types(k.dtype, g.dtype)
        return (
            sum_k[:, :, :num_full_chunks].transpose(1, 2).to(compute_dtype),
            sum_v[:, :, :num_full_chunks].transpose(1, 2).to(compute_dtype),
        )

    @staticmethod
    def backward(ctx, grad_sum_k, grad_sum_v):
        k, v, g, cos, sin = ctx.saved_tensors
        batch, seq_len, heads, head_dim = k.shape
        # One row per chunk: a [B, H, C, D] fp32 copy is small and gives the kernel one layout.
        dsum_k = grad_sum_k.transpose(1, 2).float().contiguous()
        dsum_v = grad_sum_v.transpose(1, 2).float().contiguous()
        dk, dv, dg = (new_output(x.shape, like=x) for x in (k, v, g))
        _chunk_summary_grads_kernel[(triton.cdiv(seq_len, _SCAN_BLOCK_M), batch * heads)](
            k, v, g, *_bth_strides(k), *_bth_strides(v), *_bth_strides(g), cos, sin, dsum_k, dsum_v, dk, dv, dg,
            seq_len, heads, dsum_k.shape[2],
            CHUNK=ctx.chunk_size, HALF=head_dim // 2, BLOCK_M=_SCAN_BLOCK_M, HAS_ROPE=ctx.has_rope,
        )
        return dk, dv, dg, None, None, None


def chunk_summaries_triton(
    k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int, rope_base: float | None = 10000.0, chunk_start: int = 0
) -> tuple[Tensor, Tensor]:
    """`chunk_summaries` with the scan kernel of the forward; inputs already checked by `kernels.rat`."""
    return _ChunkSummariesFunction.apply(k, v, g, chunk_size, rope_base, chunk_start)
