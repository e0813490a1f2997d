"""Causal multi-head softmax attention with RoPE, through torch SDPA."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import apply_rope, rope_angles
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer


@register_mixer("attention")
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @classmethod
    def check(cls, cfg: ModelConfig, seq_len: int) -> list[str]:
        return []

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
        # QK^T and PV: 2 matmuls of 2*d_model FLOPs per visible key; causal sees (T+1)/2 keys on average.
        return 4 * cfg.d_model * (seq_len + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).unbind(dim=2)
        cos, sin = rope_angles(torch.arange(seq_len, device=x.device), self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq_len, -1))
