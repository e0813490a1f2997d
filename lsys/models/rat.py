"""RAT: recurrence inside chunks of L tokens, softmax attention across chunk summaries.

One input projection gives the output gate z, the values v, the forget gate g (each
d_model wide) and queries/keys q, k for G groups shared by all heads (head h uses
group h mod G). The gate g = sigmoid(g + b_g) is computed in fp32 per channel; the
core (kernels.rat) runs the gated scan in fp32 too. The output is W_out(sigmoid(z) * y).
"""

import torch
from torch import Tensor, nn

import kernels
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer


@register_mixer("rat")
class RAT(nn.Module):
    def __init__(self, cfg: ModelConfig, chunk_size: int = 16, qk_groups: int = 2):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.chunk_size, self.qk_groups = chunk_size, qk_groups
        d, group_width = cfg.d_model, qk_groups * cfg.head_dim
        self.split_sizes = [d, d, d, group_width, group_width]  # z, v, g, q, k
        self.in_proj = nn.Linear(d, sum(self.split_sizes), bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(d))
        self.out = nn.Linear(d, d, bias=False)

    @classmethod
    def check(cls, cfg: ModelConfig, seq_len: int, chunk_size: int = 16, qk_groups: int = 2) -> list[str]:
        problems = []
        if chunk_size <= 0:
            problems.append(f"model.mixer_options.rat.chunk_size must be positive, got {chunk_size}")
        elif chunk_size > seq_len:
            problems.append(
                f"model.mixer_options.rat.chunk_size ({chunk_size}) exceeds data.seq_len ({seq_len}): "
                "no token would ever see a chunk summary; lower the chunk size or raise the sequence length"
            )
        if not 1 <= qk_groups <= cfg.n_heads or cfg.n_heads % qk_groups:
            problems.append(
                f"model.mixer_options.rat.qk_groups ({qk_groups}) must divide model.n_heads ({cfg.n_heads})"
            )
        return problems

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int, chunk_size: int = 16, qk_groups: int = 2) -> float:
        # Scan: ~6 FLOPs per channel for k~ and v~; attention over (T/L + 1)/2 summaries on average plus its own state.
        visible = (seq_len / chunk_size + 1) / 2 + 1
        return 12 * cfg.d_model + 4 * cfg.d_model * visible

    def forward(self, x: Tensor) -> Tensor:
        batch, seq_len, _ = x.shape
        z, v, g, q, k = self.in_proj(x).split(self.split_sizes, dim=-1)
        heads_shape = (batch, seq_len, self.n_heads, self.head_dim)
        groups_shape = (batch, seq_len, self.qk_groups, self.head_dim)
        # Head h reads group h mod G: repeat the groups along the head axis.
        repeats = self.n_heads // self.qk_groups
        q = q.view(groups_shape).repeat(1, 1, repeats, 1)
        k = k.view(groups_shape).repeat(1, 1, repeats, 1)
        forget = torch.sigmoid(g.float() + self.gate_bias.float()).view(heads_shape)
        y = kernels.rat(
            q, k, v.view(heads_shape), forget, chunk_size=self.chunk_size, rope_base=self.rope_base
        )
        return self.out(torch.sigmoid(z) * y.reshape(batch, seq_len, -1))
