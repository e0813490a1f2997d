"""Lightning attention (linear attention with a decay per head): `linear_attention(q, k, v, decay=...)`.

`naive.py` is the definition, a loop over tokens; `chunk.py` is the blocked form that
the torch backend runs.
"""

from torch import Tensor

from kernels.linear_attention.chunk import linear_attention_chunk
from kernels.linear_attention.naive import linear_attention_naive

__all__ = ["linear_attention", "linear_attention_chunk", "linear_attention_naive"]

# Backend name -> implementation; a Triton kernel joins here and becomes "auto" on CUDA.
IMPLEMENTATIONS = {"torch": linear_attention_chunk}
BACKENDS = ("auto", *IMPLEMENTATIONS)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor,
    initial_state: Tensor | None = None,
    return_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """S_t = λ_h S_{t-1} + k_t^T v_t, o_t = q_t S_t on `[B, T, H, D]`; returns out, or (out, S_{T-1})."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(q, k, v, decay, initial_state)
    implementation = IMPLEMENTATIONS["torch" if backend == "auto" else backend]
    out, state = implementation(q, k, v, decay=decay, initial_state=initial_state)
    return (out, state) if return_state else out


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
    # One host sync per call on GPU; decay is a tiny per-layer buffer and a bad one is silent otherwise.
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"linear_attention: decay must lie in (0, 1], got {decay.tolist()}")
    expected = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(
            f"linear_attention: initial_state must be [B, H, Dk, Dv] = {list(expected)}, "
            f"got {list(initial_state.shape)}"
        )
