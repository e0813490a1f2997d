"""Lightning attention (linear attention with a decay per head): `linear_attention(q, k, v, decay=...)`.

`naive.py` is the definition, a loop over tokens; `chunk.py` is the blocked form that
the torch backend runs; `triton.py` holds the Triton kernels (forward and backward),
imported only when a call runs them. With the environment variable LSYS_DEBUG=1 the decay's
range is checked on every call (a device sync, so it is off by default, as for rat's gate).
"""

import os

import torch
from torch import Tensor

from kernels.backend import BACKENDS, pick_backend
from kernels.linear_attention.chunk import linear_attention_chunk
from kernels.linear_attention.naive import linear_attention_naive
from kernels.segments import check_segment_ids
from kernels.self_check import Comparison, compare_with_reference, needs_self_check, random_inputs, self_check

__all__ = ["linear_attention", "linear_attention_chunk", "linear_attention_naive", "linear_attention_self_check"]

TRITON_HEAD_DIMS = (16, 32, 64, 128)  # Dk and Dv each; they may differ
# The self-check's problem: 80 tokens (a full and a partial 64-row block) of two heads, one decay each.
SELF_CHECK_SHAPE = (1, 80, 2)
SELF_CHECK_DECAY = (0.9, 0.999)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor,
    initial_state: Tensor | None = None,
    segment_ids: Tensor | None = None,
    return_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """S_t = λ_h S_{t-1} + k_t^T v_t, o_t = q_t S_t on `[B, T, H, D]`; returns out, or (out, S_{T-1}).

    `segment_ids [B, T]` (kernels/segments.py): the state restarts at each document's first
    token; `initial_state` then belongs to the first document and S_{T-1} is the last one's.

    `backend`: "torch" (chunk.py), "triton" (triton.py), or "auto" (Triton on CUDA when it
    can take the inputs). The Triton backend treats `decay` as a fixed buffer and gives it
    no gradient: with `decay.requires_grad`, "auto" runs torch and "triton" raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"linear_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(q, k, v, decay, initial_state)
    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[0], q.shape[1], "linear_attention", device=q.device)
    if _pick_backend(backend, q, k, v, decay, initial_state) == "triton":
        if needs_self_check(q.device):
            linear_attention_self_check(q.device, q.dtype, k.shape[-1], v.shape[-1])
        from kernels.linear_attention.triton import linear_attention_triton  # Triton reads TRITON_INTERPRET on import

        out, state = linear_attention_triton(
            q, k, v, decay=decay, initial_state=initial_state, segment_ids=segment_ids
        )
    else:
        out, state = linear_attention_chunk(
            q, k, v, decay=decay, initial_state=initial_state, segment_ids=segment_ids
        )
    return (out, state) if return_state else out


def linear_attention_self_check(
    device: torch.device, dtype: torch.dtype = torch.float32, key_dim: int = 32, value_dim: int = 32
) -> None:
    """Check the Triton kernels against the torch backend once per process and device type (kernels/self_check.py)."""
    from kernels.linear_attention import triton as lightning_kernels  # lazy, as in linear_attention()

    def comparisons() -> list[Comparison]:
        # No initial state, no documents: those are the same kernels compiled with other flags.
        decay = torch.tensor(SELF_CHECK_DECAY, device=device)
        key_shape, value_shape = (*SELF_CHECK_SHAPE, key_dim), (*SELF_CHECK_SHAPE, value_dim)
        inputs = random_inputs({"q": key_shape, "k": key_shape, "v": value_shape}, device, dtype)
        return compare_with_reference(
            lambda q, k, v: lightning_kernels.linear_attention_triton(q, k, v, decay=decay),
            lambda q, k, v: linear_attention_chunk(q, k, v, decay=decay.double()),
            inputs,
            ("out", "state"),
        )

    self_check("linear_attention", device, dtype, comparisons, lightning_kernels)


def _pick_backend(
    backend: str, q: Tensor, k: Tensor, v: Tensor, decay: Tensor, initial_state: Tensor | None
) -> str:
    """"torch" or "triton": the shared checks of kernels.backend plus this op's own (decay, one dtype)."""
    if backend == "auto" and decay.requires_grad:
        return "torch"  # a learned decay needs the torch backend's gradient; not a problem worth a warning
    tensors = {"q": q, "k": k, "v": v, "initial_state": initial_state}
    return pick_backend(
        "linear_attention", backend, tensors, head_dims=TRITON_HEAD_DIMS, op_problem=_triton_problem(q, k, v, decay)
    )


def _triton_problem(q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> str | None:
    """What the Triton kernels need beyond kernels.backend's checks, or None."""
    if decay.requires_grad:
        return (
            "decay requires grad and the Triton kernels do not differentiate it; "
            "pass decay.detach() or use backend='torch'"
        )
    if decay.device != q.device:
        return f"decay is on {decay.device} but q, k, v are on {q.device}"
    if not decay.is_floating_point():
        return f"decay has dtype {decay.dtype}; pass a floating-point tensor"
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, initial_state: Tensor | None) -> None:
    """Raise a ValueError naming the first shape or value that breaks the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"linear_attention: q, k, v must be [B, T, H, D], got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for axis, name in enumerate(("B", "T", "H")):
        sizes = {"q": q.shape[axis], "k": k.shape[axis], "v": v.shape[axis]}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"linear_attention: q, k, v disagree on {name}: {sizes}")
    batch, seq_len, heads, key_dim = q.shape
    if k.shape[-1] != key_dim:
        raise ValueError(f"linear_attention: q and k must share Dk, got {key_dim} and {k.shape[-1]}")
    if seq_len == 0:
        raise ValueError(f"linear_attention: the sequence is empty (T = 0 in q of shape {tuple(q.shape)})")
    if not isinstance(decay, Tensor) or decay.shape != (heads,):
        got = tuple(decay.shape) if isinstance(decay, Tensor) else repr(decay)
        raise ValueError(f"linear_attention: decay must be a tensor of shape [H] = [{heads}], got {got}")
    if os.environ.get("LSYS_DEBUG") == "1" and not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"linear_attention: decay must lie in (0, 1], got {decay.tolist()}")
    expected = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(
            f"linear_attention: initial_state must be [B, H, Dk, Dv] = {list(expected)}, "
            f"got {list(initial_state.shape)}"
        )
