"""Softmax attention with global positions, sliding windows and S2 sparsity; `naive.py` is its definition."""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.attention.naive import attention_naive, visible_mask
from kernels.attention.s2 import S2Pattern
from kernels.backend import BACKENDS, pick_backend
from kernels.segments import check_segment_ids
from kernels.self_check import Comparison, compare_with_reference, needs_self_check, random_inputs, self_check

__all__ = ["attention", "attention_self_check", "S2Pattern", "BACKENDS"]

TRITON_HEAD_DIMS = (16, 32, 64, 128)  # the head dims the Triton kernels are built and tested for
# Up to this many scores per (batch, head), the torch backend runs windowed and S2 attention as
# one SDPA call with the pattern as a mask (3x the chunked reference at 256 x 256 on a CPU core,
# even at 1024 x 1024); beyond it, the mask's memory and the masked-out work outweigh that.
MASKED_SDPA_MAX_SCORES = 1024 * 1024
# The self-check's problem: 80 causal tokens of two heads, at 64-row tiles a full tile and a partial one.
SELF_CHECK_SHAPE = (1, 80, 2)


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, s2: S2Pattern | None, q_start: int, k_start: int
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be 4-D [B, T, H, D], got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (batch, q_len, heads, dim), k_len = q.shape, k.shape[1]
    if k.shape != (batch, k_len, heads, dim) or v.shape != k.shape:
        raise ValueError(
            f"attention: q [B, Tq, H, D] and k, v [B, Tk, H, D] must agree on B, H, D and k, v on Tk; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q_len == 0 or k_len == 0:
        raise ValueError(f"attention: need at least one query and one key, got Tq={q_len}, Tk={k_len}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and window <= 0:
        raise ValueError(f"attention: window must be a positive number of keys (or None), got {window}")
    if q_start < 0 or k_start < 0:
        raise ValueError(f"attention: q_start and k_start are token positions >= 0, got {q_start} and {k_start}")
    if s2 is not None:
        if not isinstance(s2, S2Pattern):
            raise ValueError(f"attention: s2 must be a kernels.S2Pattern or None, got {type(s2).__name__}")
        if not causal:
            raise ValueError("attention: the S2 pattern is causal; pass causal=True with s2")
        if s2.head_start + heads > s2.num_heads:
            raise ValueError(
                f"attention: {heads} heads from head_start={s2.head_start} exceed the S2 pattern's "
                f"num_heads={s2.num_heads}"
            )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    s2: S2Pattern | None = None,
    q_start: int = 0,
    k_start: int = 0,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    k_segment_ids: Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q `[B, Tq, H, D]` over k, v `[B, Tk, H, D]` at global positions; see kernels/attention/naive.py.

    `segment_ids [B, Tq]` (kernels/segments.py) keeps each query to the keys of its own
    document; `k_segment_ids [B, Tk]` are the keys' ids when the keys are not the queries' own
    tokens (another rank's block in ring attention). With S2 the keys must be the queries' tokens.

    Returns out `[B, Tq, H, D]` in q's dtype, and with `return_lse` also lse `[B, H, Tq]`,
    fp32 (float64 for float64 inputs). Rows that see no key give out 0 and lse -inf.
    `backend`: "triton" runs the flash kernels of kernels/attention/triton.py (fp16, bf16,
    fp32; head dims TRITON_HEAD_DIMS); "auto" picks them for CUDA tensors they take.
    The "torch" backend sends plain full or causal attention without lse to torch's
    scaled_dot_product_attention, and short windowed or S2 attention too, masked; everything
    else runs in query chunks of naive.QUERY_CHUNK rows over only the visible key range,
    checkpointed when gradients are needed, so neither forward nor backward holds a Tq x Tk
    score matrix.
    """
    _check_inputs(q, k, v, causal, window, s2, q_start, k_start)
    k_segment_ids = _check_segments(q, k, s2, q_start, k_start, segment_ids, k_segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    options = dict(causal=causal, window=window, s2=s2, q_start=q_start, k_start=k_start, scale=scale)
    if segment_ids is not None:
        options.update(segment_ids=segment_ids, k_segment_ids=k_segment_ids)
    if pick_backend("attention", backend, {"q": q, "k": k, "v": v}, head_dims=TRITON_HEAD_DIMS) == "triton":
        if needs_self_check(q.device):
            attention_self_check(q.device, q.dtype, q.shape[-1])
        # Imported here: Triton fixes interpreter vs compiled when the kernels are decorated.
        from kernels.attention.triton import attention_triton

        out, lse = attention_triton(q, k, v, **options)
    else:
        out, lse = _attention_torch(q, k, v, **options, return_lse=return_lse)
    return (out, lse) if return_lse else out


def attention_self_check(device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 32) -> None:
    """Check the flash kernels against the torch backend once per process and device type (kernels/self_check.py)."""
    from kernels.attention import triton as flash_kernels  # lazy, as in attention()

    def comparisons() -> list[Comparison]:
        # Plain causal attention: the window, S2 and document masks are the same kernels compiled with
        # other flags. One compiled variant shows a broken compiler or device; the tests cover the rest.
        options = dict(causal=True, window=None, s2=None, q_start=0, k_start=0, scale=head_dim**-0.5)
        return compare_with_reference(
            lambda q, k, v: flash_kernels.attention_triton(q, k, v, **options),
            lambda q, k, v: _attention_torch(q, k, v, **options, return_lse=True),
            random_inputs(dict.fromkeys("qkv", (*SELF_CHECK_SHAPE, head_dim)), device, dtype),
            ("out", "lse"),
        )

    self_check("attention", device, dtype, comparisons, flash_kernels)


def _check_segments(
    q: Tensor, k: Tensor, s2: S2Pattern | None, q_start: int, k_start: int,
    segment_ids: Tensor | None, k_segment_ids: Tensor | None,
) -> Tensor | None:
    """The keys' segment ids (the queries' own when the keys are the queries' tokens); raises on bad ones."""
    if segment_ids is None:
        if k_segment_ids is not None:
            raise ValueError("attention: k_segment_ids given without segment_ids for the queries")
        return None
    batch, q_len = q.shape[:2]
    check_segment_ids(segment_ids, batch, q_len, "attention", device=q.device)
    same_tokens = q_start == k_start and q_len == k.shape[1]
    if k_segment_ids is None:
        if not same_tokens:
            raise ValueError(
                "attention: the keys are not the queries' tokens (other start or length); pass their k_segment_ids"
            )
        return segment_ids
    check_segment_ids(k_segment_ids, batch, k.shape[1], "attention", "k_segment_ids", device=q.device)
    if s2 is not None:
        raise ValueError("attention: S2 with segment ids needs the keys to be the queries' tokens; omit k_segment_ids")
    return k_segment_ids


def _attention_torch(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, window: int | None, s2: S2Pattern | None,
    q_start: int, k_start: int, scale: float, return_lse: bool,
    segment_ids: Tensor | None = None, k_segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    options = dict(causal=causal, window=window, s2=s2, scale=scale)
    if segment_ids is not None:
        if k_segment_ids is segment_ids:
            # Keys are the queries' tokens: each document by itself, as its definition says (and,
            # like FlashAttention's variable-length calls, with no work on pairs across documents).
            return _each_document(q, k, v, segment_ids, return_lse=return_lse, **options)
        return attention_naive(
            q, k, v, **options, q_start=q_start, k_start=k_start, segment_ids=segment_ids, k_segment_ids=k_segment_ids
        )
    # Without lse, and with offsets that cannot shift the causal diagonal (every query then sees
    # at least its own key), this is SDPA: exactly, without window or S2; with a boolean mask of
    # the pattern for short sequences, where one fused call beats the chunked reference.
    same_diagonal = not causal or (q_start == k_start and q.shape[1] == k.shape[1])
    if not return_lse and same_diagonal:
        mask = None
        if window is not None or s2 is not None:
            if q.shape[1] * k.shape[1] > MASKED_SDPA_MAX_SCORES:
                return attention_naive(q, k, v, **options, q_start=q_start, k_start=k_start)
            positions = torch.arange(q_start, q_start + q.shape[1], device=q.device)
            mask = visible_mask(positions, positions, causal=causal, window=window, s2=s2, heads=q.shape[2])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=causal and mask is None, scale=scale,
        )
        return out.transpose(1, 2), None
    return attention_naive(q, k, v, **options, q_start=q_start, k_start=k_start)


def _each_document(
    q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, *, return_lse: bool, **options
) -> tuple[Tensor, Tensor | None]:
    """The torch backend on every document of every row alone (positions from its start), put back in place."""
    outs, lses = [], []
    for row in range(q.shape[0]):
        lengths = torch.unique_consecutive(segment_ids[row], return_counts=True)[1].tolist()
        pieces = zip(*(x[row : row + 1].split(lengths, dim=1) for x in (q, k, v)))
        results = [_attention_torch(*piece, q_start=0, k_start=0, return_lse=return_lse, **options) for piece in pieces]
        outs.append(torch.cat([out for out, _ in results], dim=1))
        if return_lse:
            lses.append(torch.cat([lse for _, lse in results], dim=-1))
    return torch.cat(outs), torch.cat(lses) if return_lse else None
