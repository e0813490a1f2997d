"""Flash attention in Triton: forward, backward, causal / sliding window / S2 masks at global positions, documents.

Computes exactly what kernels/attention/naive.py defines, on q `[B, Tq, H, D]` and k, v
`[B, Tk, H, D]` (any strides with a contiguous last dim): query row r at global position
i = q_start + r sees key column c at j = k_start + c under the causal, window and S2 rules,
    lse_i = log sum_j exp(scale * q_i . k_j),   out_i = sum_j exp(scale * q_i . k_j - lse_i) v_j,
and a row that sees no key gets out 0, lse -inf and zero gradients. With segment ids
(kernels/segments.py) query i also needs key j in its document, and S2 counts its blocks
from each document's start.

Layout of the work (one program per (query or key tile, batch * head)):
  * forward: a query tile runs an online softmax over the key tiles it can see, fp32
    statistics and accumulator, and writes out and lse (fp32, `[B, H, Tq]`).
  * backward, recomputed from lse (nothing of size Tq x Tk is ever stored):
    a preprocess kernel delta_i = rowsum(dO_i * O_i) - dlse_i, then one kernel per key
    tile for dK, dV (looping over the query tiles that can see it) and one per query tile
    for dQ (looping over the key tiles it sees). With P_ij = exp(s_ij - lse_i),
    dP = dO V^T, the softmax-with-lse gradient is dS_ij = P_ij (dP_ij - delta_i): the
    `- dlse_i` folded into delta is the gradient that flows in through lse, which ring
    attention's merge needs. Each gradient element is written once, so no atomics.

Which key tiles a query tile visits: the causal and window limits bound the loop (like
naive.visible_key_range); under S2, each remaining tile is tested on block arithmetic
(`_s2_tile_visible`) and skipped, not masked, when no (query block, key block) pair inside
it is visible to this head. Tiles need not align with S2 blocks (q_start, k_start and the
tile sizes are arbitrary), so the test looks at the whole block ranges the tile spans;
inside a kept tile the element mask does the rest.

With segment ids, which are non-decreasing, a query tile's documents run from its first
row's to its last row's, so the loop also runs only from the first key of the first row's
document to the last key of the last row's (per-token document ranges computed once on the
host with searchsorted, `DocumentSpec`); key tiles of other documents are never visited.
The element mask compares the ids themselves, so it is exact whatever the tile bounds.
S2 with segment ids tests each tile on the ranges of its tokens' positions in their
documents, not on global blocks: exact for a tile inside one document (where S2's savings
on long documents are), conservative for one that straddles documents, which is kept.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.attention.s2 import S2Pattern
from kernels.backend import new_output, pinned_configs
from kernels.segments import positions_in_document

LOG2E = 1.4426950408889634  # scores go through exp2, which is cheaper than exp on the GPU
KERNEL_LOG2E = tl.constexpr(LOG2E)  # the forms the kernels can read
KERNEL_LN2 = tl.constexpr(0.6931471805599453)

# The first config of each list is the one the interpreter runs (tests); the others are autotuned on the GPU.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
KEY_GRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
QUERY_GRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
]
PREPROCESS_BLOCK_M = 64
# Configs are retuned per mask kind and head dim (Triton adds the tensors' dtypes to the key).
TUNING_KEY = ["HEAD_DIM", "CAUSAL", "WINDOWED", "HAS_S2", "HAS_SEGMENTS"]


@dataclass(frozen=True)
class MaskSpec:
    """Which keys a query sees, as the scalars the kernels take (S2 fields are 1 when unused, never read)."""

    causal: bool
    window: int | None
    s2: S2Pattern | None
    q_start: int
    k_start: int

    def kernel_args(self) -> dict:
        s2 = self.s2
        return dict(
            q_start=self.q_start, k_start=self.k_start, window=self.window or 1,
            s2_block=s2.block_size if s2 else 1, s2_local=s2.local_blocks if s2 else 1,
            s2_stride=s2.vert_stride if s2 else 1, s2_step=s2.step if s2 else 1,
            s2_head_start=s2.head_start if s2 else 0,
            CAUSAL=self.causal, WINDOWED=self.window is not None, HAS_S2=s2 is not None,
        )


@dataclass(frozen=True)
class DocumentSpec:
    """Segment ids of the queries and keys as the kernels read them (see kernels/segments.py).

    q_ids `[B, Tq]`, k_ids `[B, Tk]`: int32 or int64, contiguous along T (any batch stride);
    k_ids is q_ids when the keys are the queries' own tokens. positions `[B, T]` int32: each
    token's position in its document, for S2 only (whose keys are then the queries' tokens).
    """

    q_ids: Tensor
    k_ids: Tensor
    positions: Tensor | None

    @staticmethod
    def of(segment_ids: Tensor, k_segment_ids: Tensor | None, s2: S2Pattern | None) -> "DocumentSpec":
        """The spec of checked ids (kernels.attention._check_segments); k_segment_ids None: the queries' own."""
        q_ids = _time_contiguous(segment_ids)
        own_tokens = k_segment_ids is None or k_segment_ids is segment_ids
        k_ids = q_ids if own_tokens else _time_contiguous(k_segment_ids)
        positions = None if s2 is None else positions_in_document(segment_ids).to(torch.int32).contiguous()
        return DocumentSpec(q_ids=q_ids, k_ids=k_ids, positions=positions)


def _time_contiguous(ids: Tensor) -> Tensor:
    """The kernels index ids as batch * stride + t: a copy only when T is strided."""
    return ids if ids.stride(1) == 1 else ids.contiguous()


def _document_range(ids: Tensor, other_ids: Tensor) -> tuple[Tensor, Tensor]:
    """int32 `[B, len]` each: where each token's document begins and ends (one past) among `other_ids`' tokens.

    Both are non-decreasing, so tokens t0..t1 (a tile) meet their documents on the other side
    only inside [begin[t0], end[t1]); a token whose document is not there gets begin == end.
    """
    dtype = torch.promote_types(ids.dtype, other_ids.dtype)  # int32 and int64 ids may meet
    other_ids = other_ids.contiguous().to(dtype)
    ids = ids.contiguous().to(dtype)
    begin = torch.searchsorted(other_ids, ids, side="left").to(torch.int32)
    end = torch.searchsorted(other_ids, ids, side="right").to(torch.int32)
    return begin, end


def _document_args(documents: DocumentSpec | None, ranges: tuple[Tensor, Tensor] | None, placeholder: Tensor) -> dict:
    """The kernels' document arguments; `ranges` are _document_range of the tokens each program owns.

    Without documents HAS_SEGMENTS is False and the kernels compile as if these did not exist:
    `placeholder` (any tensor) stands in for the pointers, which are then never read.
    """
    if documents is None:
        return dict(
            q_ids_ptr=placeholder, k_ids_ptr=placeholder, stride_qib=0, stride_kib=0,
            doc_begin_ptr=placeholder, doc_end_ptr=placeholder, q_doc_pos_ptr=placeholder, k_doc_pos_ptr=placeholder,
            HAS_SEGMENTS=False,
        )
    positions = placeholder if documents.positions is None else documents.positions
    return dict(
        q_ids_ptr=documents.q_ids, k_ids_ptr=documents.k_ids,
        stride_qib=documents.q_ids.stride(0), stride_kib=documents.k_ids.stride(0),
        doc_begin_ptr=ranges[0], doc_end_ptr=ranges[1], q_doc_pos_ptr=positions, k_doc_pos_ptr=positions,
        HAS_SEGMENTS=True,
    )


# --------------------------------------------------------------------------- #
# Visibility, shared by all kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _visible(
    q_pos, k_pos, q_valid, k_valid, q_ids, k_ids, q_block_pos, k_block_pos,
    window, s2_block, s2_local, s2_stride, s2_step, head,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_S2: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """Element mask: query at global q_pos sees key at k_pos (broadcast shapes; padding rows/cols are False).

    S2 counts its blocks on q_block_pos, k_block_pos: the global positions, or with segments
    the positions in the documents. With HAS_SEGMENTS a query also needs the key's document
    (q_ids == k_ids); without it the ids are placeholders that are never read.
    """
    mask = q_valid & k_valid
    if CAUSAL:
        mask = mask & (k_pos <= q_pos)
    if WINDOWED:
        mask = mask & (q_pos - k_pos < window)
    if HAS_S2:
        # S2 comes with causal, so k_block <= q_block already holds wherever the mask is still True
        # (within one document, causality in global positions is causality in document positions).
        q_block = q_block_pos // s2_block
        k_block = k_block_pos // s2_block
        mask = mask & ((q_block - k_block < s2_local) | ((k_block + head * s2_step) % s2_stride == 0))
    if HAS_SEGMENTS:
        mask = mask & (q_ids == k_ids)
    return mask


@triton.jit
def _s2_tile_visible(q_first, q_last, k_first, k_last, s2_block, s2_local, s2_stride, s2_step, head):
    """Whether some S2 block pair inside a tile is visible; positions are inclusive ranges.

    The tile spans query blocks [qb_lo, qb_hi] and key blocks [kb_lo, kb_hi], and every pair
    of them occurs in it. A local pair exists iff the range of qb - kb meets [0, local_blocks);
    a strided pair iff some kb <= min(kb_hi, qb_hi) has (kb + head * step) % stride == 0.
    Exact at block level; the diagonal block's token causality is left to the element mask
    (the causal loop bound already keeps only tiles with some causal pair). With segments the
    ranges are those of positions in documents (_position_range): a tile's pairs need not all
    occur then, so the test is conservative (never skips a visible pair), exact for a tile
    whose rows lie in one document and whose columns lie in one.
    """
    qb_lo = q_first // s2_block
    qb_hi = q_last // s2_block
    kb_lo = k_first // s2_block
    kb_hi = k_last // s2_block
    local = (qb_lo - kb_hi < s2_local) & (qb_hi >= kb_lo)
    first_strided = kb_lo + (s2_stride - (kb_lo + head * s2_step) % s2_stride) % s2_stride
    strided = first_strided <= tl.minimum(kb_hi, qb_hi)
    return local | strided


@triton.jit
def _position_range(positions, valid):
    """(min, max) of a tile's positions over its valid entries (a tile holds at least one)."""
    return tl.min(tl.where(valid, positions, 2147483647), 0), tl.max(tl.where(valid, positions, 0), 0)


@triton.jit
def _key_tiles(
    q_first, q_last, k_start, k_len, window, doc_begin, doc_end,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_N,
):
    """Key columns [first tile start, end) that the queries at global q_first..q_last can see.

    With HAS_SEGMENTS also only columns [doc_begin, doc_end), those of the queries' documents.
    """
    col_end = k_len
    if CAUSAL:
        col_end = tl.minimum(tl.maximum(q_last + 1 - k_start, 0), k_len)
    col_begin = 0
    if WINDOWED:
        col_begin = tl.minimum(tl.maximum(q_first - window + 1 - k_start, 0), k_len)
    if HAS_SEGMENTS:
        col_begin = tl.maximum(col_begin, doc_begin)
        col_end = tl.minimum(col_end, doc_end)
        # The documents' keys can lie wholly outside the causal or window range (another rank's
        # keys): an empty range must stay empty once its start is rounded down to a tile.
        col_end = tl.where(col_begin < col_end, col_end, 0)
    return (col_begin // BLOCK_N) * BLOCK_N, col_end


@triton.jit
def _query_tiles(
    k_first, k_last, q_start, q_len, window, doc_begin, doc_end,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_M,
):
    """Query rows [first tile start, end) that see some key at global k_first..k_last (mirror of _key_tiles)."""
    row_begin = 0
    if CAUSAL:
        row_begin = tl.minimum(tl.maximum(k_first - q_start, 0), q_len)
    row_end = q_len
    if WINDOWED:
        row_end = tl.minimum(tl.maximum(k_last + window - q_start, 0), q_len)
    if HAS_SEGMENTS:
        row_begin = tl.maximum(row_begin, doc_begin)
        row_end = tl.minimum(row_end, doc_end)
        row_end = tl.where(row_begin < row_end, row_end, 0)  # empty stays empty, as in _key_tiles
    return (row_begin // BLOCK_M) * BLOCK_M, row_end


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #
@triton.autotune(configs=pinned_configs(FORWARD_CONFIGS), key=TUNING_KEY)
@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tiles_ptr, stride_tiles,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    num_heads, q_len, k_len, q_start, k_start, window,
    s2_block, s2_local, s2_stride, s2_step, s2_head_start, scale_log2,
    q_ids_ptr, k_ids_ptr, stride_qib, stride_kib, doc_begin_ptr, doc_end_ptr, q_doc_pos_ptr, k_doc_pos_ptr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_S2: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, COUNT_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out, lse of one query tile of one (batch, head), by online softmax over its visible key tiles.

    With HAS_SEGMENTS: ids q_ids `[B, Tq]`, k_ids `[B, Tk]` (batch strides stride_qib, stride_kib),
    doc_begin, doc_end `[B, Tq]` int32: the key columns of each query's document (_document_range),
    and with HAS_S2 the positions in documents q_doc_pos `[B, Tq]`, k_doc_pos `[B, Tk]` int32.
    With COUNT_TILES it also writes how many key tiles it computed (tests check the skipping).
    """
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    head64 = head.to(tl.int64)  # with a [B, H, T, D] layout, H * stride_h can pass 2**31
    dot_dtype = q_ptr.dtype.element_ty  # fp16/bf16 tiles go to tensor cores as they came in

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # offsets in 64 bits: T * stride_t can pass 2**31 at long T
    dims = tl.arange(0, HEAD_DIM)
    cols_in_tile = tl.arange(0, BLOCK_N)
    row_valid = rows < q_len
    q_pos = q_start + rows
    q_base = q_ptr + batch * stride_qb + head64 * stride_qh
    k_base = k_ptr + batch * stride_kb + head64 * stride_kh
    v_base = v_ptr + batch * stride_vb + head64 * stride_vh

    q = tl.load(q_base + rows64[:, None] * stride_qt + dims[None, :], mask=row_valid[:, None], other=0.0)
    q = q.to(tl.float32).to(dot_dtype)

    q_first = q_start + tile_m * BLOCK_M
    q_last = q_start + tl.minimum(tile_m * BLOCK_M + BLOCK_M, q_len) - 1
    q_ids = q_pos  # placeholder, read only with HAS_SEGMENTS
    q_block_pos = q_pos  # S2 counts blocks from the sequence start, or with segments from each document's
    doc_begin = 0
    doc_end = k_len
    if HAS_SEGMENTS:
        q_ids = tl.load(q_ids_ptr + batch * stride_qib + rows, mask=row_valid, other=0)
        # Ids are non-decreasing: the tile's documents are those of its first row through its last.
        doc_begin = tl.load(doc_begin_ptr + batch * q_len + tile_m * BLOCK_M)
        doc_end = tl.load(doc_end_ptr + batch * q_len + tl.minimum(tile_m * BLOCK_M + BLOCK_M, q_len) - 1)
        if HAS_S2:
            q_block_pos = tl.load(q_doc_pos_ptr + batch * q_len + rows, mask=row_valid, other=0)
            q_doc_first, q_doc_last = _position_range(q_block_pos, row_valid)
    col_begin, col_end = _key_tiles(
        q_first, q_last, k_start, k_len, window, doc_begin, doc_end, CAUSAL, WINDOWED, HAS_SEGMENTS, BLOCK_N
    )

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # in log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    tiles_computed = 0
    for col0 in range(col_begin, col_end, BLOCK_N):
        visit = True
        if HAS_S2:
            if HAS_SEGMENTS:
                # S2 blocks count from each document's start: test the tile on its document positions.
                tile_cols = col0 + cols_in_tile
                k_doc_pos = tl.load(k_doc_pos_ptr + batch * k_len + tile_cols, mask=tile_cols < k_len, other=0)
                k_doc_first, k_doc_last = _position_range(k_doc_pos, tile_cols < k_len)
                visit = _s2_tile_visible(
                    q_doc_first, q_doc_last, k_doc_first, k_doc_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
            else:
                k_last = k_start + tl.minimum(col0 + BLOCK_N, k_len) - 1
                visit = _s2_tile_visible(
                    q_first, q_last, k_start + col0, k_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
        if visit:
            tiles_computed += 1
            cols = col0 + cols_in_tile
            cols64 = cols.to(tl.int64)
            col_valid = cols < k_len
            k = tl.load(k_base + cols64[:, None] * stride_kt + dims[None, :], mask=col_valid[:, None], other=0.0)
            v = tl.load(v_base + cols64[:, None] * stride_vt + dims[None, :], mask=col_valid[:, None], other=0.0)
            k = k.to(tl.float32).to(dot_dtype)
            v = v.to(tl.float32).to(dot_dtype)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            k_pos = k_start + cols
            k_ids = k_pos  # placeholder, read only with HAS_SEGMENTS
            k_block_pos = k_pos
            if HAS_SEGMENTS:
                k_ids = tl.load(k_ids_ptr + batch * stride_kib + cols, mask=col_valid, other=0)
                if HAS_S2:
                    k_block_pos = k_doc_pos
            seen = _visible(
                q_pos[:, None], k_pos[None, :], row_valid[:, None], col_valid[None, :],
                q_ids[:, None], k_ids[None, :], q_block_pos[:, None], k_block_pos[None, :], window,
                s2_block, s2_local, s2_stride, s2_step, s2_head_start + head, CAUSAL, WINDOWED, HAS_S2, HAS_SEGMENTS,
            )
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            # A row with nothing visible yet keeps max -inf; shifting by 0 then keeps exp2 at 0, not NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + tl.dot(probs.to(dot_dtype), v, input_precision="ieee")
            row_max = new_max

    seen_any = row_sum > 0.0
    safe_sum = tl.where(seen_any, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(seen_any, (row_max + tl.log2(safe_sum)) * KERNEL_LN2, float("-inf"))
    out_base = out_ptr + batch * stride_ob + head64 * stride_oh
    tl.store(
        out_base + rows64[:, None] * stride_ot + dims[None, :], out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )
    tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, lse, mask=row_valid)
    if COUNT_TILES:
        tl.store(tiles_ptr + batch_head * stride_tiles + tile_m, tiles_computed)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #
@triton.jit
def _preprocess_kernel(
    out_ptr, dout_ptr, dlse_ptr, lse_ptr, delta_ptr,
    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
    num_heads, q_len, HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) - dlse_i (dlse = 0 without HAS_DLSE), and 0 for rows that see no key."""
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    head64 = head.to(tl.int64)  # with a [B, H, T, D] layout, H * stride_h can pass 2**31
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # offsets in 64 bits: T * stride_t can pass 2**31 at long T
    dims = tl.arange(0, HEAD_DIM)
    row_valid = rows < q_len
    out = tl.load(
        out_ptr + batch * stride_ob + head64 * stride_oh + rows64[:, None] * stride_ot + dims[None, :],
        mask=row_valid[:, None], other=0.0,
    ).to(tl.float32)
    dout = tl.load(
        dout_ptr + batch * stride_db + head64 * stride_dh + rows64[:, None] * stride_dt + dims[None, :],
        mask=row_valid[:, None], other=0.0,
    ).to(tl.float32)
    row_offset = batch_head.to(tl.int64) * q_len + rows
    lse = tl.load(lse_ptr + row_offset, mask=row_valid, other=0.0)
    delta = tl.sum(out * dout, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + row_offset, mask=row_valid, other=0.0)
    # Rows that see no key have P = 0 and zero gradients; the where also keeps a non-finite dlse of theirs out.
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    tl.store(delta_ptr + row_offset, delta, mask=row_valid)


@triton.autotune(configs=pinned_configs(KEY_GRAD_CONFIGS), key=TUNING_KEY)
@triton.jit
def _key_grad_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
    stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    num_heads, q_len, k_len, q_start, k_start, window,
    s2_block, s2_local, s2_stride, s2_step, s2_head_start, scale, scale_log2,
    q_ids_ptr, k_ids_ptr, stride_qib, stride_kib, doc_begin_ptr, doc_end_ptr, q_doc_pos_ptr, k_doc_pos_ptr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_S2: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile of one (batch, head), over the query tiles that can see it.

    Works in the transposed orientation ([keys, queries] score tiles) so that both
    accumulations are plain dots: dV += P^T dO, dK += dS^T Q * scale. Document arguments as
    in _forward_kernel, except that doc_begin, doc_end `[B, Tk]` are the query rows of each
    key's document.
    """
    tile_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    head64 = head.to(tl.int64)  # with a [B, H, T, D] layout, H * stride_h can pass 2**31
    dot_dtype = q_ptr.dtype.element_ty

    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)  # offsets in 64 bits: T * stride_t can pass 2**31 at long T
    dims = tl.arange(0, HEAD_DIM)
    rows_in_tile = tl.arange(0, BLOCK_M)
    col_valid = cols < k_len
    k_pos = k_start + cols
    q_base = q_ptr + batch * stride_qb + head64 * stride_qh
    dout_base = dout_ptr + batch * stride_db + head64 * stride_dh
    stats_base = batch_head.to(tl.int64) * q_len

    k = tl.load(
        k_ptr + batch * stride_kb + head64 * stride_kh + cols64[:, None] * stride_kt + dims[None, :],
        mask=col_valid[:, None], other=0.0,
    ).to(tl.float32).to(dot_dtype)
    v = tl.load(
        v_ptr + batch * stride_vb + head64 * stride_vh + cols64[:, None] * stride_vt + dims[None, :],
        mask=col_valid[:, None], other=0.0,
    ).to(tl.float32).to(dot_dtype)

    k_first = k_start + tile_n * BLOCK_N
    k_last = k_start + tl.minimum(tile_n * BLOCK_N + BLOCK_N, k_len) - 1
    k_ids = k_pos  # placeholder, read only with HAS_SEGMENTS
    k_block_pos = k_pos  # S2 counts blocks from the sequence start, or with segments from each document's
    doc_begin = 0
    doc_end = q_len
    if HAS_SEGMENTS:
        k_ids = tl.load(k_ids_ptr + batch * stride_kib + cols, mask=col_valid, other=0)
        # Ids are non-decreasing: the tile's documents are those of its first column through its last.
        doc_begin = tl.load(doc_begin_ptr + batch * k_len + tile_n * BLOCK_N)
        doc_end = tl.load(doc_end_ptr + batch * k_len + tl.minimum(tile_n * BLOCK_N + BLOCK_N, k_len) - 1)
        if HAS_S2:
            k_block_pos = tl.load(k_doc_pos_ptr + batch * k_len + cols, mask=col_valid, other=0)
            k_doc_first, k_doc_last = _position_range(k_block_pos, col_valid)
    row_begin, row_end = _query_tiles(
        k_first, k_last, q_start, q_len, window, doc_begin, doc_end, CAUSAL, WINDOWED, HAS_SEGMENTS, BLOCK_M
    )

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_M):
        visit = True
        if HAS_S2:
            if HAS_SEGMENTS:
                # S2 blocks count from each document's start: test the tile on its document positions.
                tile_rows = row0 + rows_in_tile
                q_doc_pos = tl.load(q_doc_pos_ptr + batch * q_len + tile_rows, mask=tile_rows < q_len, other=0)
                q_doc_first, q_doc_last = _position_range(q_doc_pos, tile_rows < q_len)
                visit = _s2_tile_visible(
                    q_doc_first, q_doc_last, k_doc_first, k_doc_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
            else:
                q_last = q_start + tl.minimum(row0 + BLOCK_M, q_len) - 1
                visit = _s2_tile_visible(
                    q_start + row0, q_last, k_first, k_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
        if visit:
            rows = row0 + rows_in_tile
            rows64 = rows.to(tl.int64)
            row_valid = rows < q_len
            q = tl.load(q_base + rows64[:, None] * stride_qt + dims[None, :], mask=row_valid[:, None], other=0.0)
            dout = tl.load(
                dout_base + rows64[:, None] * stride_dt + dims[None, :], mask=row_valid[:, None], other=0.0
            )
            q = q.to(tl.float32).to(dot_dtype)
            dout = dout.to(tl.float32).to(dot_dtype)
            lse = tl.load(lse_ptr + stats_base + rows, mask=row_valid, other=0.0)
            delta = tl.load(delta_ptr + stats_base + rows, mask=row_valid, other=0.0)
            q_pos = q_start + rows
            q_ids = q_pos  # placeholder, read only with HAS_SEGMENTS
            q_block_pos = q_pos
            if HAS_SEGMENTS:
                q_ids = tl.load(q_ids_ptr + batch * stride_qib + rows, mask=row_valid, other=0)
                if HAS_S2:
                    q_block_pos = q_doc_pos
            seen = _visible(
                q_pos[None, :], k_pos[:, None], row_valid[None, :], col_valid[:, None],
                q_ids[None, :], k_ids[:, None], q_block_pos[None, :], k_block_pos[:, None], window,
                s2_block, s2_local, s2_stride, s2_step, s2_head_start + head, CAUSAL, WINDOWED, HAS_S2, HAS_SEGMENTS,
            )
            scores_t = tl.dot(k, tl.trans(q), input_precision="ieee") * scale_log2
            # Masked first: an empty row has lse -inf, and exp2 of its (unselected) entries is inf, not NaN.
            probs_t = tl.where(seen, tl.exp2(scores_t - lse[None, :] * KERNEL_LOG2E), 0.0)
            dv += tl.dot(probs_t.to(dot_dtype), dout, input_precision="ieee")
            dprobs_t = tl.dot(v, tl.trans(dout), input_precision="ieee")
            dscores_t = probs_t * (dprobs_t - delta[None, :])
            dk += tl.dot(dscores_t.to(dot_dtype), q, input_precision="ieee")

    dk_base = dk_ptr + batch * stride_dkb + head64 * stride_dkh
    dv_base = dv_ptr + batch * stride_dvb + head64 * stride_dvh
    tl.store(
        dk_base + cols64[:, None] * stride_dkt + dims[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=col_valid[:, None],
    )
    tl.store(
        dv_base + cols64[:, None] * stride_dvt + dims[None, :], dv.to(dv_ptr.dtype.element_ty),
        mask=col_valid[:, None],
    )


@triton.autotune(configs=pinned_configs(QUERY_GRAD_CONFIGS), key=TUNING_KEY)
@triton.jit
def _query_grad_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
    stride_dqb, stride_dqt, stride_dqh,
    num_heads, q_len, k_len, q_start, k_start, window,
    s2_block, s2_local, s2_stride, s2_step, s2_head_start, scale, scale_log2,
    q_ids_ptr, k_ids_ptr, stride_qib, stride_kib, doc_begin_ptr, doc_end_ptr, q_doc_pos_ptr, k_doc_pos_ptr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_S2: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query tile of one (batch, head): dQ = dS K * scale over the key tiles it sees (as forward).

    Document arguments as in _forward_kernel.
    """
    tile_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    head64 = head.to(tl.int64)  # with a [B, H, T, D] layout, H * stride_h can pass 2**31
    dot_dtype = q_ptr.dtype.element_ty

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)  # offsets in 64 bits: T * stride_t can pass 2**31 at long T
    dims = tl.arange(0, HEAD_DIM)
    cols_in_tile = tl.arange(0, BLOCK_N)
    row_valid = rows < q_len
    q_pos = q_start + rows
    k_base = k_ptr + batch * stride_kb + head64 * stride_kh
    v_base = v_ptr + batch * stride_vb + head64 * stride_vh
    stats_offset = batch_head.to(tl.int64) * q_len + rows

    q = tl.load(
        q_ptr + batch * stride_qb + head64 * stride_qh + rows64[:, None] * stride_qt + dims[None, :],
        mask=row_valid[:, None], other=0.0,
    ).to(tl.float32).to(dot_dtype)
    dout = tl.load(
        dout_ptr + batch * stride_db + head64 * stride_dh + rows64[:, None] * stride_dt + dims[None, :],
        mask=row_valid[:, None], other=0.0,
    ).to(tl.float32).to(dot_dtype)
    lse = tl.load(lse_ptr + stats_offset, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + stats_offset, mask=row_valid, other=0.0)

    q_first = q_start + tile_m * BLOCK_M
    q_last = q_start + tl.minimum(tile_m * BLOCK_M + BLOCK_M, q_len) - 1
    q_ids = q_pos  # placeholder, read only with HAS_SEGMENTS
    q_block_pos = q_pos
    doc_begin = 0
    doc_end = k_len
    if HAS_SEGMENTS:
        q_ids = tl.load(q_ids_ptr + batch * stride_qib + rows, mask=row_valid, other=0)
        doc_begin = tl.load(doc_begin_ptr + batch * q_len + tile_m * BLOCK_M)
        doc_end = tl.load(doc_end_ptr + batch * q_len + tl.minimum(tile_m * BLOCK_M + BLOCK_M, q_len) - 1)
        if HAS_S2:
            q_block_pos = tl.load(q_doc_pos_ptr + batch * q_len + rows, mask=row_valid, other=0)
            q_doc_first, q_doc_last = _position_range(q_block_pos, row_valid)
    col_begin, col_end = _key_tiles(
        q_first, q_last, k_start, k_len, window, doc_begin, doc_end, CAUSAL, WINDOWED, HAS_SEGMENTS, BLOCK_N
    )

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for col0 in range(col_begin, col_end, BLOCK_N):
        visit = True
        if HAS_S2:
            if HAS_SEGMENTS:
                # S2 blocks count from each document's start: test the tile on its document positions.
                tile_cols = col0 + cols_in_tile
                k_doc_pos = tl.load(k_doc_pos_ptr + batch * k_len + tile_cols, mask=tile_cols < k_len, other=0)
                k_doc_first, k_doc_last = _position_range(k_doc_pos, tile_cols < k_len)
                visit = _s2_tile_visible(
                    q_doc_first, q_doc_last, k_doc_first, k_doc_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
            else:
                k_last = k_start + tl.minimum(col0 + BLOCK_N, k_len) - 1
                visit = _s2_tile_visible(
                    q_first, q_last, k_start + col0, k_last,
                    s2_block, s2_local, s2_stride, s2_step, s2_head_start + head,
                )
        if visit:
            cols = col0 + cols_in_tile
            cols64 = cols.to(tl.int64)
            col_valid = cols < k_len
            k = tl.load(k_base + cols64[:, None] * stride_kt + dims[None, :], mask=col_valid[:, None], other=0.0)
            v = tl.load(v_base + cols64[:, None] * stride_vt + dims[None, :], mask=col_valid[:, None], other=0.0)
            k = k.to(tl.float32).to(dot_dtype)
            v = v.to(tl.float32).to(dot_dtype)
            k_pos = k_start + cols
            k_ids = k_pos  # placeholder, read only with HAS_SEGMENTS
            k_block_pos = k_pos
            if HAS_SEGMENTS:
                k_ids = tl.load(k_ids_ptr + batch * stride_kib + cols, mask=col_valid, other=0)
                if HAS_S2:
                    k_block_pos = k_doc_pos
            seen = _visible(
                q_pos[:, None], k_pos[None, :], row_valid[:, None], col_valid[None, :],
                q_ids[:, None], k_ids[None, :], q_block_pos[:, None], k_block_pos[None, :], window,
                s2_block, s2_local, s2_stride, s2_step, s2_head_start + head, CAUSAL, WINDOWED, HAS_S2, HAS_SEGMENTS,
            )
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            probs = tl.where(seen, tl.exp2(scores - lse[:, None] * KERNEL_LOG2E), 0.0)
            dprobs = tl.dot(dout, tl.trans(v), input_precision="ieee")
            dscores = probs * (dprobs - delta[:, None])
            dq += tl.dot(dscores.to(dot_dtype), k, input_precision="ieee")

    tl.store(
        dq_ptr + batch * stride_dqb + head64 * stride_dqh + rows64[:, None] * stride_dqt + dims[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_valid[:, None],
    )


# --------------------------------------------------------------------------- #
# Launchers and autograd
# --------------------------------------------------------------------------- #
def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, time, head) strides of a `[B, T, H, D]` tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def forward(
    q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, scale: float, *,
    documents: DocumentSpec | None = None, count_tiles: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out, lse fp32 `[B, H, Tq]`, key tiles computed per (batch*head, query tile) or None) without autograd.

    `documents`: the segment ids (DocumentSpec.of) or None; the tile count then counts only visited tiles.
    """
    batch, q_len, heads, dim = q.shape
    out = new_output(q.shape, like=q)
    lse = new_output((batch, heads, q_len), like=q, dtype=torch.float32)
    # Sized for the smallest query tile of any config; the kernel fills the first cdiv(Tq, BLOCK_M) columns.
    max_tiles = triton.cdiv(q_len, min(c.kwargs["BLOCK_M"] for c in FORWARD_CONFIGS))
    tiles = torch.full((batch * heads, max_tiles), -1, dtype=torch.int32, device=q.device) if count_tiles else lse

    key_ranges = None if documents is None else _document_range(documents.q_ids, documents.k_ids)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads

    _forward_kernel[grid](
        q, k, v, out, lse, tiles, tiles.stride(0), *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, q_len, k.shape[1], **mask.kernel_args(), scale_log2=scale * LOG2E,
        **_document_args(documents, key_ranges, lse), HEAD_DIM=dim, COUNT_TILES=count_tiles,
    )
    return out, lse, tiles if count_tiles else None


def backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    mask: MaskSpec, scale: float, documents: DocumentSpec | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' dtype, recomputing probabilities from lse; dlse is contiguous fp32 or None."""
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    delta = new_output((batch, heads, q_len), like=q, dtype=torch.float32)
    _preprocess_kernel[(triton.cdiv(q_len, PREPROCESS_BLOCK_M), batch * heads)](
        out, dout, lse if dlse is None else dlse, lse, delta, *_strides(out), *_strides(dout), heads, q_len,
        HEAD_DIM=dim, HAS_DLSE=dlse is not None, BLOCK_M=PREPROCESS_BLOCK_M,
    )
    dq, dk, dv = new_output(q.shape, like=q), new_output(k.shape, like=k), new_output(v.shape, like=v)
    common = dict(**mask.kernel_args(), scale=scale, scale_log2=scale * LOG2E, HEAD_DIM=dim)

    def key_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(k_len, meta["BLOCK_N"]), batch * heads

    def query_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads

    # The key-grad kernel loops over queries, so it takes each key's query rows; the query-grad kernel the reverse.
    key_ranges = query_ranges = None
    if documents is not None:
        key_ranges = _document_range(documents.q_ids, documents.k_ids)
        own_tokens = documents.k_ids is documents.q_ids
        query_ranges = key_ranges if own_tokens else _document_range(documents.k_ids, documents.q_ids)

    inputs = (q, k, v, dout, lse, delta)
    input_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    _key_grad_kernel[key_grid](
        *inputs, dk, dv, *input_strides, *_strides(dk), *_strides(dv), heads, q_len, k_len, **common,
        **_document_args(documents, query_ranges, lse),
    )
    _query_grad_kernel[query_grid](
        *inputs, dq, *input_strides, *_strides(dq), heads, q_len, k_len, **common,
        **_document_args(documents, key_ranges, lse),
    )
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    """(out, lse) with both outputs differentiable; backward takes d(out) and d(lse)."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, scale: float, documents: DocumentSpec | None
    ) -> tuple[Tensor, Tensor]:
        out, lse, _ = forward(q, k, v, mask, scale, documents=documents)
        # lse is saved even when the caller drops it: backward recomputes the probabilities from it.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.documents = mask, scale, documents
        ctx.set_materialize_grads(False)  # an unused lse then costs no zero-filled gradient (dlse is None)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        dq, dk, dv = backward(q, k, v, out, lse, dout, dlse, ctx.mask, ctx.scale, ctx.documents)
        return dq, dk, dv, None, None, None


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, window: int | None, s2: S2Pattern | None,
    q_start: int, k_start: int, scale: float,
    segment_ids: Tensor | None = None, k_segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Flash attention (out in q's dtype, lse fp32 `[B, H, Tq]`), differentiable in both; inputs already checked."""
    mask = MaskSpec(causal=causal, window=window, s2=s2, q_start=q_start, k_start=k_start)
    documents = None if segment_ids is None else DocumentSpec.of(segment_ids, k_segment_ids, s2)
    return _AttentionFunction.apply(q, k, v, mask, scale, documents)
