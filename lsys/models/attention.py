"""Causal multi-head softmax attention with RoPE, and its key/value cache.

`local` and `s2` subclass this: they change which keys a query sees (`mask_options`)
and what the decoding cache keeps (`init_cache`, `store_*`, `cached_keys`).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import parallel
from kernels import apply_rope, rope_angles
from lsys.models.cache import Cache, attend, rotate_rows
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer
from parallel.documents import Documents


@dataclass
class KVCache(Cache):
    keys: Tensor  # [B, max_len, H, D], rotated
    values: Tensor


@register_mixer("attention")
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.scale = cfg.head_dim**-0.5
        self.kernel_backend = cfg.kernel_backend
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @classmethod
    def check(cls, cfg: ModelConfig, seq_len: int) -> list[str]:
        return []

    @classmethod
    def sequence_multiple(cls, cfg: ModelConfig, **options) -> int:
        """What each rank's piece of a split sequence must hold a multiple of: 1, as ring and Ulysses split anywhere."""
        return 1

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
        # QK^T and PV: 2 matmuls of 2*d_model FLOPs per visible key; causal sees (T+1)/2 keys on average.
        return 4 * cfg.d_model * (seq_len + 1) / 2

    def mask_options(self) -> dict:
        """Extra arguments of parallel.attention that shape the mask (window, s2)."""
        return {}

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        return self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).unbind(dim=2)

    def forward(self, x: Tensor, documents: Documents | None = None) -> Tensor:
        return self._attend(x, documents)[0]

    def _attend(self, x: Tensor, documents: Documents | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Output for this rank's tokens of a whole sequence, and their rotated keys and values."""
        batch, seq_len, _ = x.shape
        q, k, v = self.project(x)
        positions = parallel.local_positions(seq_len, x.device, documents)
        cos, sin = rope_angles(positions, self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = parallel.attention(q, k, v, documents=documents, backend=self.kernel_backend, **self.mask_options())
        return self.out(y.reshape(batch, seq_len, -1)), k, v

    # Decoding: prefill writes a prompt's keys, decode adds one token per row.

    def init_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch_size, max_len, self.n_heads, self.head_dim)
        return KVCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
        )

    def prefill(self, x: Tensor, cache: Cache) -> Tensor:
        """Like forward for prompts starting at position 0 (every row of `x` as long), filling `cache`."""
        y, k, v = self._attend(x)
        self.store_prompt(cache, k, v)
        cache.lengths += x.shape[1]
        return y

    def decode(self, x: Tensor, cache: Cache) -> Tensor:
        """One new token per row, `x [B, 1, d_model]`, at each row's own position."""
        positions = cache.lengths.clone()
        q, k, v = self.project(x)
        q, k = rotate_rows(q, positions, self.rope_base), rotate_rows(k, positions, self.rope_base)
        self.store_token(cache, k, v, positions)
        keys, values, visible = self.cached_keys(cache, positions)
        y = attend(q, keys, values, visible, self.scale)
        cache.lengths += 1
        return self.out(y.reshape(x.shape[0], 1, -1))

    def store_prompt(self, cache: KVCache, k: Tensor, v: Tensor) -> None:
        cache.keys[:, : k.shape[1]] = k
        cache.values[:, : v.shape[1]] = v

    def store_token(self, cache: KVCache, k: Tensor, v: Tensor, positions: Tensor) -> None:
        rows = torch.arange(k.shape[0], device=k.device)
        cache.keys[rows, positions] = k[:, 0]
        cache.values[rows, positions] = v[:, 0]

    def cached_keys(self, cache: KVCache, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and the `[B, S]` or `[B, H, S]` mask of what each row's new token sees."""
        slots = torch.arange(cache.keys.shape[1], device=positions.device)
        return cache.keys, cache.values, slots[None, :] <= positions[:, None]
