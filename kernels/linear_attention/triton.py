"""Lightning attention in Triton: forward and backward kernels behind one autograd Function.

The recurrence (naive.py) is S_t = λ S_{t-1} + k_t^T v_t, o_t = q_t S_t. Every pass of
forward and backward has the same shape, a "decayed attention pass" over a sequence
(a query, key, value) with a carried [key dim, value dim] state:

    out_i = Σ_{j<=i} λ^(i-j) (a_i · b_j) c_j + λ^(i+1) a_i S_prev,    S = Σ_j λ^(·) b_j^T c_j

    forward   (a, b, c) = (q, k, v)    state S           -> o, S_{T-1}
    dq        (a, b, c) = (dO, v, k)   state S^T         -> dq = dO_t S_t^T
    dv        (a, b, c) = (k, q, dO)   state G, reversed -> dv = k_t G_t, G_0
    dk        (a, b, c) = (v, dO, q)   state G^T, rev.   -> dk = v_t G_t^T

where G_t = Σ_{s>=t} λ^(s-t) q_s^T dO_s + λ^(T-1-t) dS_{T-1} is the gradient reaching
S_t (the "state of dO"), which is the forward recurrence run backwards in time. Its
start, G_T = dS_{T-1} / λ, is passed as dS_{T-1} with a flag ("predecayed") that drops
one power of λ from its contributions, so nothing is ever divided by λ.
d initial_state = λ G_0.

Parallelism (the H100 target is tokens/s flat in T at fixed B·T): the sequence is cut
into segments of SEGMENT_BLOCKS blocks of BLOCK_SIZE rows. A pass runs in up to three
launches:
  1. `_segment_states_kernel`: each full segment's own state from a zero start (one
     accumulated matmul per segment), all segments in parallel;
  2. `_segment_scan_kernel`: the states at each segment start, a short scan over segments;
  3. `_decayed_attention_kernel`: per (batch·head, value tile, segment), lightning's loop
     over the segment's blocks: intra-block quadratic with the decay mask plus the
     inter-block term from the fp32 state held in registers.
The grid of 1 and 3 grows with B·T/segment, not with B, so the work per token and the
parallelism are the same at T = 2K and T = 128K. The forward keeps its segment-start
states (one fp32 state per segment, about 1/6 of q, k, v's bytes at D = 128) so that the
dq pass skips launches 1 and 2, and the dk pass reuses the dv pass's.

Documents: with `segment_ids` (kernels/segments.py; "document ids" below, since a segment
here is a span of SEGMENT_BLOCKS blocks) the state restarts at each document's first token.
The backward's G restarts the same way in reverse time, and dS_{T-1} belongs to the last
document as initial_state belongs to the first, so every pass keeps the masks of chunk.py
in its own processing order: intra-block scores only between rows of one document; the
term of the carried state only for rows still in the document of the token before the
block (before the first one: the first token's, which owns the start state); and a block,
or a whole segment in launches 1-2, carries the state only when its last row is still in
that document and adds only the rows of its last row's document. Ids are monotone along
T, so "in the last row's document" is "id equal to the last row's". The masks sit behind
the constexpr HAS_DOCUMENTS: without ids the kernels compile to the code they had before.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.backend import new_output, pinned_configs

BLOCK_SIZE = 64  # rows per block: each block costs a BLOCK_SIZE² score tile per value tile
SEGMENT_BLOCKS = 8  # blocks per segment: 512 tokens run sequentially in one program
SCAN_BLOCK = 1024  # state elements per program of the segment scan


def _value_tile_configs() -> list:
    """Value-dim tiles: the fp32 state tile [key dim, BLOCK_V] lives in registers."""
    return pinned_configs([
        triton.Config({"BLOCK_V": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_V": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_V": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_V": 16}, num_warps=4, num_stages=2),
    ])


def _fitting_value_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than the value dim (they would only compute masked columns)."""
    value_dim = {**named_args, **kwargs}["VALUE_DIM"]
    fitting = [config for config in configs if config.kwargs["BLOCK_V"] <= value_dim]
    return fitting or configs[:1]


@triton.jit
def _dot(x, y, DTYPE: tl.constexpr):
    """x @ y with fp32 accumulation: exact fp32 for fp32 inputs, tensor cores in the input dtype otherwise."""
    if DTYPE == tl.float32:
        return tl.dot(x, y, input_precision="ieee")
    else:
        return tl.dot(x.to(DTYPE), y.to(DTYPE))


@triton.jit
def _document_ids(document_base, position, seq_len, REVERSE: tl.constexpr):
    """The document id at processing position(s) `position` (a scalar or a block of rows); -1 past the end.

    Rows past the end have zero keys, values and queries, so their id never matters.
    """
    token = (seq_len - 1 - position) if REVERSE else position
    return tl.load(document_base + token, mask=position < seq_len, other=-1)


@triton.autotune(
    configs=_value_tile_configs(),
    key=["KEY_DIM", "VALUE_DIM"],
    prune_configs_by={"early_config_prune": _fitting_value_tiles},
)
@triton.jit
def _segment_states_kernel(
    key_ptr, value_ptr, log_decay_ptr, local_ptr, document_ptr,
    seq_len, heads,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_lb, stride_lh, stride_ls, stride_lk,
    stride_db,
    KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr, SEGMENT_BLOCKS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_DOCUMENTS: tl.constexpr,
):
    """local[s] = Σ_{t in segment s} λ^(L-1-t) b_t^T c_t (t counted from the segment start, L its length).

    Only full segments come here (all but the last one in processing order), so no row
    is masked for length. The powers of λ are applied to the keys directly, so the sum is
    one accumulated matmul with no decay of the accumulator between blocks. With
    HAS_DOCUMENTS the sum keeps only the rows of the segment's last document.
    """
    DTYPE: tl.constexpr = key_ptr.dtype.element_ty
    SEGMENT_LEN: tl.constexpr = BLOCK_T * SEGMENT_BLOCKS
    pid_bh, pid_v, segment = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = pid_bh // heads, pid_bh % heads
    log_decay = tl.load(log_decay_ptr + head)
    key_cols = tl.arange(0, KEY_DIM)
    value_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    value_ok = value_cols < VALUE_DIM
    rows = tl.arange(0, BLOCK_T)
    key_base = key_ptr + batch * stride_kb + head * stride_kh
    value_base = value_ptr + batch * stride_vb + head * stride_vh
    if HAS_DOCUMENTS:
        document_base = document_ptr + batch * stride_db
        last_document = _document_ids(document_base, segment * SEGMENT_LEN + SEGMENT_LEN - 1, seq_len, REVERSE)

    local = tl.zeros([KEY_DIM, BLOCK_V], dtype=tl.float32)
    for block in range(SEGMENT_BLOCKS):
        in_segment = block * BLOCK_T + rows
        position = segment * SEGMENT_LEN + in_segment  # in processing order
        token = (seq_len - 1 - position) if REVERSE else position
        keys = tl.load(key_base + token[:, None] * stride_kt + key_cols[None, :]).to(tl.float32)
        values = tl.load(
            value_base + token[:, None] * stride_vt + value_cols[None, :], mask=value_ok[None, :], other=0.0
        ).to(tl.float32)
        keys = keys * tl.exp((SEGMENT_LEN - 1 - in_segment) * log_decay)[:, None]
        if HAS_DOCUMENTS:
            documents = _document_ids(document_base, position, seq_len, REVERSE)
            keys = tl.where((documents == last_document)[:, None], keys, 0.0)
        local += _dot(tl.trans(keys), values, DTYPE)

    local_ptrs = (local_ptr + batch * stride_lb + head * stride_lh + segment * stride_ls
                  + key_cols[:, None] * stride_lk + value_cols[None, :])
    tl.store(local_ptrs, local, mask=value_ok[None, :])


@triton.jit
def _segment_scan_kernel(
    local_ptr, initial_ptr, starts_ptr, log_decay_ptr, document_ptr,
    seq_len, num_segments, heads, start_predecayed,
    stride_lb, stride_lh, stride_ls,
    stride_ib, stride_ih, stride_ik, stride_iv,
    stride_sb, stride_sh, stride_ss,
    stride_db,
    KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, SEGMENT_LEN: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_INITIAL: tl.constexpr, REVERSE: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
):
    """starts[0] = initial, starts[s+1] = λ^L starts[s] + local[s]: the state before each segment.

    With `start_predecayed` = 1 the initial state is stored as λ·S, so its first step
    decays by λ^(L-1). `local` and `starts` are contiguous in their [key, value] dims.
    With HAS_DOCUMENTS the λ^L starts[s] term is dropped where segment s ends in another
    document than the token before it (the first token, for s = 0) holds.
    """
    pid_bh, pid_e = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // heads, pid_bh % heads
    log_decay = tl.load(log_decay_ptr + head)
    elements = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    element_ok = elements < KEY_DIM * VALUE_DIM
    key_index, value_index = elements // VALUE_DIM, elements % VALUE_DIM
    local_base = local_ptr + batch * stride_lb + head * stride_lh + elements
    starts_base = starts_ptr + batch * stride_sb + head * stride_sh + elements

    if HAS_INITIAL:
        initial_ptrs = (initial_ptr + batch * stride_ib + head * stride_ih
                        + key_index * stride_ik + value_index * stride_iv)
        state = tl.load(initial_ptrs, mask=element_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_E], dtype=tl.float32)
    tl.store(starts_base, state, mask=element_ok)
    state = tl.exp((SEGMENT_LEN - start_predecayed) * log_decay) * state
    if HAS_DOCUMENTS:
        document_base = document_ptr + batch * stride_db
        previous_document = _document_ids(document_base, 0, seq_len, REVERSE)
        last_document = _document_ids(document_base, SEGMENT_LEN - 1, seq_len, REVERSE)
        state = tl.where(last_document == previous_document, state, 0.0)
    state += tl.load(local_base, mask=element_ok, other=0.0)
    tl.store(starts_base + stride_ss, state, mask=element_ok)
    segment_decay = tl.exp(SEGMENT_LEN * log_decay)
    for segment in range(1, num_segments - 1):
        kept = segment_decay * state
        if HAS_DOCUMENTS:
            previous_document = _document_ids(document_base, segment * SEGMENT_LEN - 1, seq_len, REVERSE)
            last_document = _document_ids(document_base, segment * SEGMENT_LEN + SEGMENT_LEN - 1, seq_len, REVERSE)
            kept = tl.where(last_document == previous_document, kept, 0.0)
        state = kept + tl.load(local_base + segment * stride_ls, mask=element_ok, other=0.0)
        tl.store(starts_base + (segment + 1) * stride_ss, state, mask=element_ok)


@triton.autotune(
    configs=_value_tile_configs(),
    key=["KEY_DIM", "VALUE_DIM"],
    prune_configs_by={"early_config_prune": _fitting_value_tiles},
)
@triton.jit
def _decayed_attention_kernel(
    query_ptr, key_ptr, value_ptr, out_ptr, starts_ptr, final_ptr, log_decay_ptr, document_ptr,
    seq_len, heads, start_predecayed,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_sb, stride_sh, stride_ss, stride_sk, stride_sv,
    stride_fb, stride_fh, stride_fk,
    stride_db,
    KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr, SEGMENT_BLOCKS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_START: tl.constexpr, WRITE_FINAL: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
):
    """One segment of the decayed attention pass for one (batch, head, value tile).

    From the segment's start state S (starts[segment], or zero), for each block of rows
    i = 0..n-1 (in processing order; REVERSE walks the tokens from the end):
        out_i = Σ_{j<=i} λ^(i-j) (a_i · b_j) c_j + λ^(i+1) a_i S
        S    <- λ^n S + Σ_j λ^(n-1-j) b_j^T c_j
    The last segment's program writes the final S when WRITE_FINAL. In segment 0 with
    `start_predecayed` = 1 the start state is λ·S, so its first block uses one power less.
    With HAS_DOCUMENTS, the masks of the module docstring: same-document scores, the S term
    for rows in the document of the token before the block, and S's update per document.
    """
    DTYPE: tl.constexpr = query_ptr.dtype.element_ty
    SEGMENT_LEN: tl.constexpr = BLOCK_T * SEGMENT_BLOCKS
    pid_bh, pid_v, segment = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = pid_bh // heads, pid_bh % heads
    log_decay = tl.load(log_decay_ptr + head)
    key_cols = tl.arange(0, KEY_DIM)
    value_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    value_ok = value_cols < VALUE_DIM
    rows = tl.arange(0, BLOCK_T)
    query_base = query_ptr + batch * stride_qb + head * stride_qh
    key_base = key_ptr + batch * stride_kb + head * stride_kh
    value_base = value_ptr + batch * stride_vb + head * stride_vh
    out_base = out_ptr + batch * stride_ob + head * stride_oh

    lag = rows[:, None] - rows[None, :]
    intra_decay = tl.where(lag >= 0, tl.exp(tl.maximum(lag, 0) * log_decay), 0.0)  # same for every block
    query_decay = tl.exp((rows + 1) * log_decay)

    if HAS_START:
        start_ptrs = (starts_ptr + batch * stride_sb + head * stride_sh + segment * stride_ss
                      + key_cols[:, None] * stride_sk + value_cols[None, :] * stride_sv)
        state = tl.load(start_ptrs, mask=value_ok[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros([KEY_DIM, BLOCK_V], dtype=tl.float32)
    # 1 only for the first block of segment 0 when the start state is λ·S; 0 after it.
    state_shift = tl.where(segment == 0, start_predecayed, 0).to(tl.float32)
    if HAS_DOCUMENTS:
        document_base = document_ptr + batch * stride_db
        # The document that owns `state`: the token before the segment's, or the first token's.
        state_document = _document_ids(document_base, tl.maximum(segment * SEGMENT_LEN - 1, 0), seq_len, REVERSE)

    segment_start = segment * SEGMENT_LEN
    num_blocks = tl.minimum(tl.cdiv(seq_len - segment_start, BLOCK_T), SEGMENT_BLOCKS)
    for block in range(num_blocks):
        block_start = segment_start + block * BLOCK_T
        position = block_start + rows
        row_ok = position < seq_len
        token = (seq_len - 1 - position) if REVERSE else position
        queries = tl.load(query_base + token[:, None] * stride_qt + key_cols[None, :],
                          mask=row_ok[:, None], other=0.0).to(tl.float32)
        keys = tl.load(key_base + token[:, None] * stride_kt + key_cols[None, :],
                       mask=row_ok[:, None], other=0.0).to(tl.float32)
        values = tl.load(value_base + token[:, None] * stride_vt + value_cols[None, :],
                         mask=row_ok[:, None] & value_ok[None, :], other=0.0).to(tl.float32)

        scores = _dot(queries, tl.trans(keys), DTYPE) * intra_decay
        if HAS_DOCUMENTS:
            documents = _document_ids(document_base, position, seq_len, REVERSE)
            scores = tl.where(documents[:, None] == documents[None, :], scores, 0.0)
        out = _dot(scores, values, DTYPE)
        state_queries = queries * (query_decay * tl.exp(-state_shift * log_decay))[:, None]
        if HAS_DOCUMENTS:
            state_queries = tl.where((documents == state_document)[:, None], state_queries, 0.0)
        out += _dot(state_queries, state, DTYPE)
        tl.store(out_base + token[:, None] * stride_ot + value_cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & value_ok[None, :])

        block_len = tl.minimum(seq_len - block_start, BLOCK_T)
        # Rows past the end have zero keys; clamping keeps their weight finite (no 0 * inf).
        key_decay = tl.exp(tl.maximum(block_len - 1 - rows, 0) * log_decay)
        state = tl.exp((block_len - state_shift) * log_decay) * state
        state_keys = keys * key_decay[:, None]
        if HAS_DOCUMENTS:
            last_document = _document_ids(document_base, block_start + block_len - 1, seq_len, REVERSE)
            state = tl.where(last_document == state_document, state, 0.0)
            state_keys = tl.where((documents == last_document)[:, None], state_keys, 0.0)
            state_document = last_document
        state += _dot(tl.trans(state_keys), values, DTYPE)
        state_shift = state_shift * 0.0

    if WRITE_FINAL:
        if segment == tl.num_programs(2) - 1:
            final_ptrs = (final_ptr + batch * stride_fb + head * stride_fh
                          + key_cols[:, None] * stride_fk + value_cols[None, :])
            tl.store(final_ptrs, state, mask=value_ok[None, :])


def _decayed_attention_pass(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    log_decay: Tensor,
    *,
    start_states: Tensor | None,
    document_ids: Tensor | None,
    initial: Tensor | None = None,
    start_predecayed: bool = False,
    reverse: bool = False,
    write_final: bool = True,
    block_size: int = BLOCK_SIZE,
    segment_blocks: int = SEGMENT_BLOCKS,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One pass (see the module docstring) on [B, T, H, ·] tensors; returns (out, final state, start states).

    `start_states` [B, H, segments, key dim, value dim] (any strides) skips launches 1-2;
    otherwise they are computed from `initial` [B, H, key dim, value dim] (None = zeros).
    `document_ids` [B, T] (int32 or int64, contiguous along T) or None: one document.
    """
    batch, seq_len, heads, key_dim = query.shape
    value_dim = value.shape[-1]
    segment_len = block_size * segment_blocks
    num_segments = triton.cdiv(seq_len, segment_len)
    if start_states is None:
        start_states = _segment_start_states(
            key, value, log_decay, initial, document_ids, start_predecayed=start_predecayed, reverse=reverse,
            block_size=block_size, segment_blocks=segment_blocks,
        )

    out = new_output((batch, seq_len, heads, value_dim), like=value)
    final = new_output((batch, heads, key_dim, value_dim), like=value, dtype=torch.float32) if write_final else None
    starts_arg = start_states if start_states is not None else out  # unread when HAS_START is off
    start_strides = start_states.stride() if start_states is not None else (0,) * 5
    final_arg = final if final is not None else out
    final_strides = final.stride()[:3] if final is not None else (0,) * 3
    document_arg = document_ids if document_ids is not None else log_decay  # unread when HAS_DOCUMENTS is off
    document_stride = document_ids.stride(0) if document_ids is not None else 0

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * heads, triton.cdiv(value_dim, meta["BLOCK_V"]), num_segments

    _decayed_attention_kernel[grid](
        query, key, value, out, starts_arg, final_arg, log_decay, document_arg,
        seq_len, heads, int(start_predecayed),
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *start_strides,
        *final_strides,
        document_stride,
        KEY_DIM=key_dim, VALUE_DIM=value_dim, BLOCK_T=block_size, SEGMENT_BLOCKS=segment_blocks,
        REVERSE=reverse, HAS_START=start_states is not None, WRITE_FINAL=write_final,
        HAS_DOCUMENTS=document_ids is not None,
    )
    return out, final, start_states


def _segment_start_states(
    key: Tensor,
    value: Tensor,
    log_decay: Tensor,
    initial: Tensor | None,
    document_ids: Tensor | None,
    *,
    start_predecayed: bool,
    reverse: bool,
    block_size: int,
    segment_blocks: int,
) -> Tensor | None:
    """The state before each segment, [B, H, segments, key dim, value dim] fp32; a view of `initial` if one segment."""
    batch, seq_len, heads, key_dim = key.shape
    value_dim = value.shape[-1]
    segment_len = block_size * segment_blocks
    num_segments = triton.cdiv(seq_len, segment_len)
    if num_segments == 1:
        return None if initial is None else initial.unsqueeze(2)

    local = new_output((batch, heads, num_segments - 1, key_dim, value_dim), like=key, dtype=torch.float32)
    document_arg = document_ids if document_ids is not None else log_decay  # unread when HAS_DOCUMENTS is off
    document_stride = document_ids.stride(0) if document_ids is not None else 0

    def grid(meta: dict) -> tuple[int, int, int]:
        return batch * heads, triton.cdiv(value_dim, meta["BLOCK_V"]), num_segments - 1

    _segment_states_kernel[grid](
        key, value, log_decay, local, document_arg,
        seq_len, heads,
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        local.stride(0), local.stride(1), local.stride(2), local.stride(3),
        document_stride,
        KEY_DIM=key_dim, VALUE_DIM=value_dim, BLOCK_T=block_size, SEGMENT_BLOCKS=segment_blocks, REVERSE=reverse,
        HAS_DOCUMENTS=document_ids is not None,
    )

    starts = new_output((batch, heads, num_segments, key_dim, value_dim), like=key, dtype=torch.float32)
    initial_arg = initial if initial is not None else starts  # unread when HAS_INITIAL is off
    initial_strides = initial.stride() if initial is not None else (0,) * 4
    _segment_scan_kernel[(batch * heads, triton.cdiv(key_dim * value_dim, SCAN_BLOCK))](
        local, initial_arg, starts, log_decay, document_arg,
        seq_len, num_segments, heads, int(start_predecayed),
        local.stride(0), local.stride(1), local.stride(2),
        *initial_strides,
        starts.stride(0), starts.stride(1), starts.stride(2),
        document_stride,
        KEY_DIM=key_dim, VALUE_DIM=value_dim, SEGMENT_LEN=segment_len,
        BLOCK_E=SCAN_BLOCK, HAS_INITIAL=initial is not None, REVERSE=reverse, HAS_DOCUMENTS=document_ids is not None,
    )
    return starts


def _transposed(states: Tensor | None) -> Tensor | None:
    """The same states with key and value dims swapped (a view: the kernels take any strides)."""
    return None if states is None else states.transpose(-1, -2)


class LinearAttentionFunction(torch.autograd.Function):
    """Lightning attention with hand-written Triton forward and backward; decay is not differentiated."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_decay: Tensor,
        initial_state: Tensor | None,
        document_ids: Tensor | None,
        block_size: int,
        segment_blocks: int,
    ) -> tuple[Tensor, Tensor]:
        out, final_state, start_states = _decayed_attention_pass(
            q, k, v, log_decay, start_states=None, document_ids=document_ids, initial=initial_state,
            block_size=block_size, segment_blocks=segment_blocks,
        )
        ctx.save_for_backward(q, k, v, log_decay, start_states, document_ids)
        ctx.block_size, ctx.segment_blocks = block_size, segment_blocks
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_final_state: Tensor | None):
        q, k, v, log_decay, start_states, document_ids = ctx.saved_tensors
        # Every pass walks the same documents (the backward's in reverse time).
        blocks = {"block_size": ctx.block_size, "segment_blocks": ctx.segment_blocks, "document_ids": document_ids}
        need_q, need_k, need_v, _, need_initial = ctx.needs_input_grad[:5]
        need_initial = need_initial and ctx.initial_dtype is not None
        grad_q = grad_k = grad_v = grad_initial = None
        if grad_out is not None and grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        if grad_final_state is not None and grad_final_state.stride(-1) != 1:
            grad_final_state = grad_final_state.contiguous()

        if need_q:
            if grad_out is None:  # only the returned state was used: it does not depend on q
                grad_q = torch.zeros_like(q)
            else:
                grad_q, _, _ = _decayed_attention_pass(
                    grad_out, v, k, log_decay, start_states=_transposed(start_states), write_final=False, **blocks
                )
        if not (need_k or need_v or need_initial):
            return grad_q, None, None, None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(v)
        # dv_t = k_t G_t, run backwards in time; dS_{T-1} enters as λ·G_T.
        grad_v, first_reverse_state, reverse_starts = _decayed_attention_pass(
            k, q, grad_out, log_decay, start_states=None, initial=grad_final_state,
            start_predecayed=True, reverse=True, write_final=need_initial, **blocks,
        )
        if need_k:
            grad_k, _, _ = _decayed_attention_pass(
                v, grad_out, q, log_decay, start_states=_transposed(reverse_starts),
                start_predecayed=True, reverse=True, write_final=False, **blocks,
            )
        if need_initial:
            grad_initial = (log_decay.exp()[:, None, None] * first_reverse_state).to(ctx.initial_dtype)
        return grad_q, grad_k, grad_v if need_v else None, None, grad_initial, None, None, None


def linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor,
    initial_state: Tensor | None = None,
    segment_ids: Tensor | None = None,
    block_size: int = BLOCK_SIZE,
    segment_blocks: int = SEGMENT_BLOCKS,
) -> tuple[Tensor, Tensor]:
    """Triton lightning attention on `[B, T, H, D]`; returns (out `[B, T, H, Dv]`, S_{T-1} `[B, H, Dk, Dv]` fp32).

    Inputs are checked by the public op (`kernels.linear_attention`); `decay` gets no gradient.
    `segment_ids [B, T]` (kernels/segments.py) restarts the state at each document's first token.
    `block_size` (a power of two >= 16) and `segment_blocks` exist for tests of the segment scan.
    """
    log_decay = decay.detach().to(device=q.device, dtype=torch.float32).log().contiguous()
    document_ids = None
    if segment_ids is not None:
        # The kernels read int32 or int64 ids with a batch stride and unit stride along T.
        document_ids = segment_ids if segment_ids.dtype in (torch.int32, torch.int64) else segment_ids.long()
        document_ids = document_ids if document_ids.stride(-1) == 1 else document_ids.contiguous()
    return LinearAttentionFunction.apply(q, k, v, log_decay, initial_state, document_ids, block_size, segment_blocks)
