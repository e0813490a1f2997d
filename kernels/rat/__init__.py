"""The fused RAT layer core: `rat(q, k, v, g, chunk_size=...)`; `naive.py` is its definition.

With the environment variable LSYS_DEBUG=1 the gate's range is checked on every call
(a device sync, so it is off by default).
"""

import os

from torch import Tensor

from kernels.rat.naive import chunk_summaries, rat_naive

__all__ = ["rat", "chunk_summaries"]

BACKENDS = ("auto", "torch")


def rat(
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
    backend: str = "auto",
) -> Tensor:
    """RAT core on `[B, T, H, D]` tensors (g: forget gate in (0, 1)); see kernels/rat/naive.py."""
    if backend not in BACKENDS:
        raise ValueError(f"rat: unknown backend {backend!r}; choose one of {BACKENDS}")
    if chunk_size <= 0:
        raise ValueError(f"rat: chunk_size must be positive, got {chunk_size}")
    if not (q.shape == k.shape == v.shape == g.shape) or q.dim() != 4:
        raise ValueError(
            f"rat: q, k, v, g must share one [B, T, H, D] shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}"
        )
    if os.environ.get("LSYS_DEBUG") == "1" and not ((g > 0) & (g < 1)).all():
        raise ValueError(
            f"rat: the forget gate g must lie in (0, 1), got values in [{g.min().item()}, {g.max().item()}]"
        )
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("rat: pass prefix_k and prefix_v together")
    return rat_naive(
        q, k, v, g, chunk_size=chunk_size, rope_base=rope_base,
        prefix_k=prefix_k, prefix_v=prefix_v, chunk_start=chunk_start,
    )
