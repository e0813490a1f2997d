"""Sliding-window attention: each token sees the last `window` tokens, itself included.

Its decoding cache is a ring buffer of `window` keys and values, whatever the context length.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from lsys.models.attention import Attention
from lsys.models.cache import Cache, bookkeeping
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer


@dataclass
class WindowCache(Cache):
    keys: Tensor  # [B, window, H, D]; position p lives in slot p % window
    values: Tensor
    slot_positions: Tensor = bookkeeping()  # [B, window]: the position held by each slot, -1 if empty


@register_mixer("local")
class LocalAttention(Attention):
    def __init__(self, cfg: ModelConfig, window: int = 1024):
        super().__init__(cfg)
        self.window = window

    @classmethod
    def check(cls, cfg: ModelConfig, seq_len: int, window: int = 1024) -> list[str]:
        return [] if window >= 1 else [f"model.mixer_options.local.window must be positive, got {window}"]

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int, window: int = 1024) -> float:
        visible = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
        return 4 * cfg.d_model * visible

    def mask_options(self) -> dict:
        return {"window": self.window}

    def init_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> WindowCache:
        slots = min(self.window, max_len)
        shape = (batch_size, slots, self.n_heads, self.head_dim)
        return WindowCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            slot_positions=torch.full((batch_size, slots), -1, dtype=torch.long, device=device),
        )

    def store_prompt(self, cache: WindowCache, k: Tensor, v: Tensor) -> None:
        slots = cache.keys.shape[1]
        positions = torch.arange(max(0, k.shape[1] - slots), k.shape[1], device=k.device)
        cache.keys[:, positions % slots] = k[:, positions]
        cache.values[:, positions % slots] = v[:, positions]
        cache.slot_positions[:, positions % slots] = positions

    def store_token(self, cache: WindowCache, k: Tensor, v: Tensor, positions: Tensor) -> None:
        rows = torch.arange(k.shape[0], device=k.device)
        slots = positions % cache.keys.shape[1]
        cache.keys[rows, slots] = k[:, 0]
        cache.values[rows, slots] = v[:, 0]
        cache.slot_positions[rows, slots] = positions

    def cached_keys(self, cache: WindowCache, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        held = cache.slot_positions
        visible = (held >= 0) & (positions[:, None] - held < self.window)
        return cache.keys, cache.values, visible
