"""Lightning attention, TransNormerLLM style: linear attention with a fixed decay per head.

Choices (TransNormerLLM, Qin et al. 2023, with these simplifications):
- q = SiLU(W_q x), k = SiLU(W_k x), v = W_v x: the Swish kernel on queries and keys, no scale.
- Decay λ_h = exp(-2^(-8(h+1)/H)), fixed, not learned; it is the only position signal
  (no LRPE rotation).
- o = Σ_{s<=t} λ^(t-s) (q_t·k_s) v_s (kernels.linear_attention), then RMSNorm per head
  (TNL normalises the attention output instead of dividing by a denominator) and an
  output gate: out = W_o(norm(o) * sigmoid(W_u x)).
Decoding keeps one D x D state per head, whatever the context length.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
import parallel
from lsys.models.cache import Cache
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer
from parallel.documents import Documents


def lightning_decays(n_heads: int) -> Tensor:
    """λ_h = exp(-2^(-8(h+1)/H)) for h < H, float64."""
    heads = torch.arange(n_heads, dtype=torch.float64)
    return torch.exp(-(2.0 ** (-8.0 * (heads + 1) / n_heads)))


@dataclass
class LinearStateCache(Cache):
    state: Tensor  # [B, H, D, D], fp32 at least


@register_mixer("lightning")
class Lightning(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.kernel_backend = cfg.n_heads, cfg.head_dim, cfg.kernel_backend
        self.in_proj = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)  # q, k, v, gate
        self.norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @property
    def decay(self) -> Tensor:
        # Not a buffer: model.to(bfloat16) would round λ (0.996 and 0.998 would collide).
        return lightning_decays(self.n_heads).to(device=self.out.weight.device, dtype=torch.float32)

    @classmethod
    def check(cls, cfg: ModelConfig, seq_len: int) -> list[str]:
        return []

    @classmethod
    def sequence_multiple(cls, cfg: ModelConfig, **options) -> int:
        """What each rank's piece of a split sequence must hold a multiple of: 1, as LASP passes on a state."""
        return 1

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
        # Recurrent form: a D x D state update and a D x D read-out per head.
        return 4 * cfg.d_model * cfg.head_dim

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        q, k, v, gate = self.in_proj(x).view(batch, seq_len, 4, self.n_heads, self.head_dim).unbind(dim=2)
        return F.silu(q), F.silu(k), v, gate

    def _output(self, o: Tensor, gate: Tensor) -> Tensor:
        return self.out((self.norm(o) * torch.sigmoid(gate)).flatten(2))

    def forward(self, x: Tensor, documents: Documents | None = None) -> Tensor:
        q, k, v, gate = self.project(x)
        o = parallel.linear_attention(q, k, v, decay=self.decay, documents=documents, backend=self.kernel_backend)
        return self._output(o, gate)

    def init_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LinearStateCache:
        state_dtype = torch.promote_types(dtype, torch.float32)
        shape = (batch_size, self.n_heads, self.head_dim, self.head_dim)
        return LinearStateCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            state=torch.zeros(shape, device=device, dtype=state_dtype),
        )

    def prefill(self, x: Tensor, cache: LinearStateCache) -> Tensor:
        q, k, v, gate = self.project(x)
        o, state = kernels.linear_attention(q, k, v, decay=self.decay, return_state=True, backend=self.kernel_backend)
        cache.state[:] = state
        cache.lengths += x.shape[1]
        return self._output(o, gate)

    def decode(self, x: Tensor, cache: LinearStateCache) -> Tensor:
        q, k, v, gate = self.project(x)
        state_dtype = cache.state.dtype
        decay = self.decay.to(state_dtype)[None, :, None, None]
        k_t, v_t = k[:, 0].to(state_dtype), v[:, 0].to(state_dtype)  # [B, H, D]
        cache.state[:] = decay * cache.state + k_t[..., :, None] * v_t[..., None, :]
        o = torch.einsum("bhd,bhde->bhe", q[:, 0].to(state_dtype), cache.state)[:, None].to(v.dtype)
        cache.lengths += 1
        return self._output(o, gate)
