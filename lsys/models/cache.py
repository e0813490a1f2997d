"""Decoding caches: each mixer keeps its own small state between tokens.

A cache is a dataclass of tensors whose first dimension is the batch, with `lengths [B]`,
the tokens each row has seen. `row(b)` is a view of one row, so prompts of different
lengths are prefilled one by one into the same batched cache, and decoding then runs the
whole batch at once with per-row positions.
"""

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from kernels import apply_rope, rope_angles


def bookkeeping():
    """Marks a cache field that is not model state (positions, counters): `nbytes` leaves it out."""
    return field(metadata={"bookkeeping": True})


@dataclass
class Cache:
    lengths: Tensor = bookkeeping()  # [B] int64: tokens seen by each row

    def row(self, index: int) -> "Cache":
        """A view of row `index`: writes into it land in this cache."""
        return type(self)(**{f.name: getattr(self, f.name)[index : index + 1] for f in fields(self)})

    def nbytes(self) -> int:
        """Bytes of model state held (keys, values, summaries, recurrent states)."""
        state = [getattr(self, f.name) for f in fields(self) if not f.metadata.get("bookkeeping")]
        return sum(t.numel() * t.element_size() for t in state)


def rotate_rows(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE for one token per row: `x [B, 1, H, D]` rotated by `positions [B]`."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    return apply_rope(x.transpose(0, 1), cos, sin).transpose(0, 1)


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """One query per row over cached keys: q `[B, 1, H, D]`, k/v `[B, S, H, D]`, visible `[B, S]` or `[B, H, S]`."""
    scores = torch.einsum("bqhd,bshd->bhqs", q, k) * scale
    if visible.dim() == 2:
        visible = visible[:, None, :]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    return torch.einsum("bhqs,bshd->bqhd", scores.softmax(dim=-1), v)
