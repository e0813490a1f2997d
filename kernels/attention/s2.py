"""The S2 block-sparse attention pattern (DKernel), shared by every backend and by the S2 mixer.

With block size b, query position i and key position j fall in blocks bi = i // b and
bj = j // b (global positions). Head h sees key block bj from query block bi when
    bj <= bi  and  (bi - bj < local_blocks  or  (bj + h * step) % vert_stride == 0),
with step = max(1, vert_stride // num_heads); inside the diagonal block the usual token
causality j <= i still applies. Each head keeps its own 1/vert_stride share of the
distant blocks, so the heads together cover all of them only when num_heads >= vert_stride.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BLOCK_SIZE = 16  # smaller blocks make the block-sparse kernels pointless (and tl.dot needs >= 16)


@dataclass(frozen=True)
class S2Pattern:
    """Which key blocks each head sees; `head_start` is the global index of the first local head."""

    block_size: int
    local_blocks: int
    vert_stride: int
    num_heads: int
    head_start: int = 0

    def __post_init__(self) -> None:
        if self.block_size < MIN_BLOCK_SIZE:
            raise ValueError(f"S2 block size must be at least {MIN_BLOCK_SIZE}, got {self.block_size}")
        if self.local_blocks < 1:
            raise ValueError(f"S2 local_blocks must be at least 1, got {self.local_blocks}")
        if self.vert_stride < 1:
            raise ValueError(f"S2 vert_stride must be at least 1, got {self.vert_stride}")
        if self.num_heads < 1:
            raise ValueError(f"S2 num_heads must be at least 1, got {self.num_heads}")
        if not 0 <= self.head_start < self.num_heads:
            raise ValueError(f"S2 head_start must lie in [0, num_heads={self.num_heads}), got {self.head_start}")
        # Warn once, where the pattern is built (once per layer), rather than on every call.
        self.check_coverage()

    @property
    def step(self) -> int:
        """How far apart consecutive heads' strided shares are, in blocks."""
        return max(1, self.vert_stride // self.num_heads)

    def block_visible(self, head: int, q_block: int, k_block: int) -> bool:
        """Whether global head `head` lets query block `q_block` see key block `k_block`."""
        if k_block > q_block:
            return False
        return q_block - k_block < self.local_blocks or (k_block + head * self.step) % self.vert_stride == 0

    def token_mask(self, q_positions: Tensor, k_positions: Tensor, heads: int) -> Tensor:
        """Bool `[..., heads, Tq, Tk]`: S2 visibility (with token causality) for heads head_start..head_start+heads-1.

        Positions are `[Tq]`, `[Tk]`, or per batch row `[B, Tq]`, `[B, Tk]`.
        """
        if self.head_start + heads > self.num_heads:
            raise ValueError(
                f"S2 pattern has {self.num_heads} heads; local heads {self.head_start}..{self.head_start + heads - 1} "
                f"do not fit"
            )
        q_blocks = q_positions // self.block_size
        k_blocks = k_positions // self.block_size
        head_ids = torch.arange(self.head_start, self.head_start + heads, device=k_positions.device)
        causal = k_positions[..., None, :] <= q_positions[..., :, None]  # token level; implies k_block <= q_block
        local = (q_blocks[..., :, None] - k_blocks[..., None, :]) < self.local_blocks  # [..., Tq, Tk]
        strided = (k_blocks[..., None, :] + head_ids[:, None] * self.step) % self.vert_stride == 0  # [..., heads, Tk]
        return causal[..., None, :, :] & (local[..., None, :, :] | strided[..., :, None, :])

    def covers_all_blocks(self) -> bool:
        """Whether the union of all num_heads heads sees every causal block pair, at any sequence length."""
        # Beyond the local window, head h sees exactly the key blocks with
        # bj = -h*step (mod vert_stride), whatever the query block; so the heads cover
        # everything iff their residues are all vert_stride of them.
        residues = {(-head * self.step) % self.vert_stride for head in range(self.num_heads)}
        return len(residues) == self.vert_stride

    def check_coverage(self) -> None:
        """Warn (UserWarning) when some distant key blocks are seen by no head at all."""
        if not self.covers_all_blocks():
            warnings.warn(
                f"S2 pattern with num_heads={self.num_heads} and vert_stride={self.vert_stride} leaves some key "
                f"blocks farther than local_blocks={self.local_blocks} unseen by every head; "
                f"use num_heads >= vert_stride for full coverage",
                UserWarning,
                stacklevel=2,
            )

    def kept_fraction(self, seq_len: int) -> float:
        """Fraction of causal (query block, key block) pairs visible at `seq_len` tokens, averaged over heads."""
        if seq_len < 1:
            raise ValueError(f"kept_fraction needs a positive seq_len, got {seq_len}")
        num_blocks = -(-seq_len // self.block_size)
        k_blocks = torch.arange(num_blocks)
        query_blocks_at_or_after = num_blocks - k_blocks  # causal pairs in which key block bj takes part
        visible = 0
        for head in range(self.num_heads):
            strided = (k_blocks + head * self.step) % self.vert_stride == 0
            local = query_blocks_at_or_after.clamp(max=self.local_blocks)
            visible += torch.where(strided, query_blocks_at_or_after, local).sum().item()
        causal_pairs = num_blocks * (num_blocks + 1) // 2
        return visible / (causal_pairs * self.num_heads)
