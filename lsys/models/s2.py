"""S2 attention: each head sees the local blocks plus its own strided share of earlier blocks.

The pattern (kernels.S2Pattern): with block size b, head h's query block i sees key block
j <= i when i - j < local_blocks or (j + h*step) % vert_stride == 0. Every head keeps a
different 1/vert_stride of the distant context, so together they cover it (when
n_heads >= vert_stride) while each computes only its share.

Decoding cache: a ring of the last `local_blocks` blocks (all heads), and per head only
the distant blocks it can still see: block j of head h sits in slot j // vert_stride,
since head h's blocks are exactly those with j = r_h (mod vert_stride).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import S2Pattern
from lsys.models.attention import Attention
from lsys.models.cache import Cache, bookkeeping
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer


@dataclass
class S2Cache(Cache):
    local_keys: Tensor  # [B, local_blocks * b, H, D]; position p in slot p % (local_blocks * b)
    local_values: Tensor
    strided_keys: Tensor  # [B, slots * b, H, D]: head h's block j at rows (j // vert_stride) * b + offset
    strided_values: Tensor
    local_positions: Tensor = bookkeeping()  # [B, local_blocks * b], -1 where empty


@register_mixer("s2")
class S2Attention(Attention):
    def __init__(self, cfg: ModelConfig, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8):
        super().__init__(cfg)
        self.pattern = S2Pattern(block_size, local_blocks, vert_stride, num_heads=cfg.n_heads)
        step = max(1, vert_stride // cfg.n_heads)
        # Head h sees the distant blocks j with j % vert_stride == (-h * step) % vert_stride.
        self.register_buffer(
            "head_residue", (-torch.arange(cfg.n_heads) * step) % vert_stride, persistent=False
        )

    @classmethod
    def check(
        cls, cfg: ModelConfig, seq_len: int, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8
    ) -> list[str]:
        problems = []
        if block_size < 16:
            problems.append(f"model.mixer_options.s2.block_size must be at least 16, got {block_size}")
        if local_blocks < 1 or vert_stride < 1:
            problems.append(
                f"model.mixer_options.s2 local_blocks ({local_blocks}) and vert_stride ({vert_stride}) must be positive"
            )
        return problems

    @classmethod
    def attention_flops_per_token(
        cls, cfg: ModelConfig, seq_len: int, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8
    ) -> float:
        pattern = S2Pattern(block_size, local_blocks, vert_stride, num_heads=cfg.n_heads)
        return 4 * cfg.d_model * (seq_len + 1) / 2 * pattern.kept_fraction(seq_len)

    def mask_options(self) -> dict:
        return {"s2": self.pattern}

    def init_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> S2Cache:
        b, heads, dim = self.pattern.block_size, self.n_heads, self.head_dim
        local_slots = self.pattern.local_blocks * b
        strided_slots = -(-max_len // (b * self.pattern.vert_stride)) * b

        def zeros(slots: int) -> Tensor:
            return torch.zeros(batch_size, slots, heads, dim, device=device, dtype=dtype)

        return S2Cache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            local_keys=zeros(local_slots),
            local_values=zeros(local_slots),
            local_positions=torch.full((batch_size, local_slots), -1, dtype=torch.long, device=device),
            strided_keys=zeros(strided_slots),
            strided_values=zeros(strided_slots),
        )

    def _is_strided(self, blocks: Tensor) -> Tensor:
        """`[..., H]`: whether each head keeps key block `blocks[...]` in its strided share."""
        return blocks[..., None] % self.pattern.vert_stride == self.head_residue

    def _strided_slot(self, positions: Tensor) -> Tensor:
        b = self.pattern.block_size
        return (positions // b // self.pattern.vert_stride) * b + positions % b

    def store_prompt(self, cache: S2Cache, k: Tensor, v: Tensor) -> None:
        positions = torch.arange(k.shape[1], device=k.device)
        local_slots = cache.local_keys.shape[1]
        recent = positions[-local_slots:]
        cache.local_keys[:, recent % local_slots] = k[:, recent]
        cache.local_values[:, recent % local_slots] = v[:, recent]
        cache.local_positions[:, recent % local_slots] = recent
        kept = self._is_strided(positions // self.pattern.block_size)  # [T, H]
        for head in range(self.n_heads):
            mine = positions[kept[:, head]]  # one block per slot group for a given head
            cache.strided_keys[:, self._strided_slot(mine), head] = k[:, mine, head]
            cache.strided_values[:, self._strided_slot(mine), head] = v[:, mine, head]

    def store_token(self, cache: S2Cache, k: Tensor, v: Tensor, positions: Tensor) -> None:
        rows = torch.arange(k.shape[0], device=k.device)
        local = positions % cache.local_keys.shape[1]
        cache.local_keys[rows, local] = k[:, 0]
        cache.local_values[rows, local] = v[:, 0]
        cache.local_positions[rows, local] = positions
        keep = self._is_strided(positions // self.pattern.block_size)[..., None]  # [B, H, 1]
        strided = self._strided_slot(positions)
        cache.strided_keys[rows, strided] = torch.where(keep, k[:, 0], cache.strided_keys[rows, strided])
        cache.strided_values[rows, strided] = torch.where(keep, v[:, 0], cache.strided_values[rows, strided])

    def cached_keys(self, cache: S2Cache, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, local_blocks = self.pattern.block_size, self.pattern.local_blocks
        query_block = positions // b  # [B]
        held = cache.local_positions
        local_visible = (held >= 0) & (query_block[:, None] - held // b < local_blocks)  # [B, S_local]
        # Strided slot s of head h holds block j = (s // b) * vert_stride + residue_h; it is
        # read only once it is out of the local window (it is complete by then).
        slot_group = torch.arange(cache.strided_keys.shape[1], device=positions.device) // b
        blocks = slot_group[None, :] * self.pattern.vert_stride + self.head_residue[:, None]  # [H, S_strided]
        strided_visible = query_block[:, None, None] - blocks[None] >= local_blocks  # [B, H, S_strided]
        heads = self.n_heads
        visible = torch.cat([local_visible[:, None, :].expand(-1, heads, -1), strided_visible], dim=-1)
        keys = torch.cat([cache.local_keys, cache.strided_keys], dim=1)
        values = torch.cat([cache.local_values, cache.strided_values], dim=1)
        return keys, values, visible
