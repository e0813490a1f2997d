"""Rotary position embedding in the rotate-half form shared by every backend."""

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of `pos * base^(-2i/D)` for i < D/2, shaped [*positions.shape, D/2], float64 (cast at use)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x [..., T, H, D]` by per-position angles `cos/sin [..., T, D/2]` (per row too, for per-document
    positions): [x1*cos - x2*sin, x2*cos + x1*sin]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos[..., None, :].to(x.dtype)  # broadcast over heads
    sin = sin[..., None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_matrices(positions: Tensor, head_dim: int, base: float, scale: float = 1.0) -> Tensor:
    """`[*positions.shape, D, D]` matrices R, float64, with `x @ R` = apply_rope of x at that position, times scale.

    For angles shared by many rows, as RAT's per-chunk rotation is by every token and head of a chunk,
    one matmul replaces the half-split, the four products and the concatenation (and their backward).
    """
    cos, sin = (torch.diag_embed(x) for x in rope_angles(positions, head_dim, base))
    # Rows of R are x's halves (x1 then x2), columns the output's: [[cos, sin], [-sin, cos]] per frequency.
    matrices = torch.cat([torch.cat([cos, sin], dim=-1), torch.cat([-sin, cos], dim=-1)], dim=-2)
    return matrices * scale
