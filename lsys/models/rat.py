"""RAT: recurrence inside chunks of L tokens, softmax attention across chunk summaries.

One input projection gives the output gate z, the values v, the forget gate g (each
d_model wide) and queries/keys q, k for G groups shared by all heads (head h uses
group h mod G). The gate g = sigmoid(g + b_g) is computed in fp32 per channel; the
core (kernels.rat) runs the gated scan in fp32 too. The output is W_out(sigmoid(z) * y).

Init as the RAT paper's code: the gate bias b_g is drawn per channel as log U(1, L - 1), so
each forget gate starts between 0.5 and 1 - 1/L and a chunk summary starts out remembering
its whole chunk rather than its last few tokens (L <= 2 gives b_g = 0, gates at 0.5).

Decoding cache: the chunk summaries seen so far (T/L of them, rotated) plus the running
state of the current chunk: L times smaller than attention's keys and values.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import kernels
import parallel
from kernels.rat.chunk import gated_chunk_scan
from lsys.models.cache import Cache, attend, rotate_rows
from lsys.models.config import ModelConfig
from lsys.models.registry import register_mixer
from parallel.documents import Documents


@dataclass
class RATCache(Cache):
    summary_keys: Tensor  # [B, max_chunks, H, D], key summaries rotated by their chunk index
    summary_values: Tensor
    state_keys: Tensor  # [B, 1, H, D] running k~ and v~ of the current chunk (fp32 at least)
    state_values: Tensor


@register_mixer("rat")
class RAT(nn.Module):
    def __init__(self, cfg: ModelConfig, chunk_size: int = 16, qk_groups: int = 2):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.chunk_size, self.qk_groups = chunk_size, qk_groups
        self.kernel_backend = cfg.kernel_backend
        self.scale = cfg.head_dim**-0.5
        d, group_width = cfg.d_model, qk_groups * cfg.head_dim
        self.split_sizes = [d, d, d, group_width, group_width]  # z, v, g, q, k
        self.in_proj = nn.Linear(d, sum(self.split_sizes), bias=False)
        self.gate_bias = nn.Parameter(torch.empty(d))
        self.out = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the gate bias as log U(1, L - 1) per channel; the LM initialises the projections."""
        with torch.no_grad():
            self.gate_bias.uniform_(1.0, max(1.0, self.chunk_size - 1.0)).log_()

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
    def sequence_multiple(cls, cfg: ModelConfig, chunk_size: int = 16, qk_groups: int = 2) -> int:
        """What each rank's piece of a split sequence must hold a multiple of: whole chunks, for RAT-SP."""
        return chunk_size

    @classmethod
    def attention_flops_per_token(cls, cfg: ModelConfig, seq_len: int, chunk_size: int = 16, qk_groups: int = 2) -> float:
        # Scan: ~6 FLOPs per channel for k~ and v~. Attention: a token of chunk c sees the c summaries before its
        # chunk and its own state, (T/L - 1)/2 + 1 = (T/L + 1)/2 on average.
        visible = (seq_len / chunk_size + 1) / 2
        return 12 * cfg.d_model + 4 * cfg.d_model * visible

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(z, q, k, v, forget gate), the last four as `[B, T, H, D]` with the q/k groups repeated over heads."""
        batch, seq_len, _ = x.shape
        z, v, g, q, k = self.in_proj(x).split(self.split_sizes, dim=-1)
        heads_shape = (batch, seq_len, self.n_heads, self.head_dim)
        groups_shape = (batch, seq_len, self.qk_groups, self.head_dim)
        # Head h reads group h mod G: the groups repeated along the head axis (by cat, which copies
        # the strided slices of the projection in one pass, where `repeat` is ~1.7x slower on CPU).
        repeats = self.n_heads // self.qk_groups
        q = torch.cat([q.view(groups_shape)] * repeats, dim=2)
        k = torch.cat([k.view(groups_shape)] * repeats, dim=2)
        gate_dtype = torch.promote_types(g.dtype, torch.float32)  # fp32 under bf16 autocast
        forget = torch.sigmoid(g.to(gate_dtype) + self.gate_bias.to(gate_dtype)).view(heads_shape)
        return z, q, k, v.view(heads_shape), forget

    def forward(self, x: Tensor, documents: Documents | None = None) -> Tensor:
        z, q, k, v, forget = self.project(x)
        y = parallel.rat(
            q, k, v, forget, chunk_size=self.chunk_size, rope_base=self.rope_base, documents=documents,
            backend=self.kernel_backend,
        )
        return self.gated_output(z, y)

    def gated_output(self, z: Tensor, y: Tensor) -> Tensor:
        """W_out(sigmoid(z) * y) for the core's output y `[B, T, H, D]`."""
        # The product takes the layout of its first factor, the fresh sigmoid(z): y (heads-first inside
        # the core, so strided here) is then flattened without a copy of its own.
        return self.out((torch.sigmoid(z).view_as(y) * y).flatten(2))

    def init_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RATCache:
        chunks = -(-max_len // self.chunk_size)
        state_dtype = torch.promote_types(dtype, torch.float32)

        def zeros(length: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(batch_size, length, self.n_heads, self.head_dim, device=device, dtype=dtype)

        return RATCache(
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            summary_keys=zeros(chunks, dtype),
            summary_values=zeros(chunks, dtype),
            state_keys=zeros(1, state_dtype),
            state_values=zeros(1, state_dtype),
        )

    def prefill(self, x: Tensor, cache: RATCache) -> Tensor:
        """Like forward for prompts starting at position 0, keeping the summaries and the running state."""
        z, q, k, v, forget = self.project(x)
        y, summary_k, summary_v = kernels.rat(
            q, k, v, forget, chunk_size=self.chunk_size, rope_base=self.rope_base, return_summaries=True,
            backend=self.kernel_backend,
        )
        cache.summary_keys[:, : summary_k.shape[1]] = summary_k
        cache.summary_values[:, : summary_v.shape[1]] = summary_v
        tail = x.shape[1] % self.chunk_size  # tokens of the unfinished last chunk
        if tail:
            # Its running state, which no summary holds: a scan of under L tokens.
            state_dtype = cache.state_keys.dtype
            streams = [x[:, -tail:][:, None].to(state_dtype) for x in (k, v)]  # one chunk of `tail` tokens
            _, finals = gated_chunk_scan(streams, forget[:, -tail:][:, None].to(state_dtype))
            cache.state_keys[:], cache.state_values[:] = finals
        cache.lengths += x.shape[1]
        return self.gated_output(z, y)

    def decode(self, x: Tensor, cache: RATCache) -> Tensor:
        """One token per row: advance the chunk's running state, attend to earlier summaries and to it."""
        positions = cache.lengths
        chunk = positions // self.chunk_size
        z, q, k, v, forget = self.project(x)
        state_dtype = cache.state_keys.dtype
        fresh = (positions % self.chunk_size == 0)[:, None, None, None]  # a new chunk starts from a zero state
        state_k = torch.where(fresh, 0.0, cache.state_keys)
        state_v = torch.where(fresh, 0.0, cache.state_values)
        state_k = forget * state_k + (1 - forget) * k.to(state_dtype)
        state_v = forget * state_v + (1 - forget) * v.to(state_dtype)
        cache.state_keys[:], cache.state_values[:] = state_k, state_v

        q = rotate_rows(q.to(state_dtype), chunk, self.rope_base)
        own_key = rotate_rows(state_k, chunk, self.rope_base)
        keys = torch.cat([cache.summary_keys.to(state_dtype), own_key], dim=1)
        values = torch.cat([cache.summary_values.to(state_dtype), state_v], dim=1)
        slots = torch.arange(keys.shape[1], device=x.device)
        visible = (slots[None, :] < chunk[:, None]) | (slots[None, :] == keys.shape[1] - 1)
        y = attend(q, keys, values, visible, self.scale).to(v.dtype)

        # A chunk that ends with this token leaves its summary for every later token.
        complete = ((positions + 1) % self.chunk_size == 0)[:, None, None]
        rows = torch.arange(x.shape[0], device=x.device)
        for summaries, state in ((cache.summary_keys, own_key), (cache.summary_values, state_v)):
            summaries[rows, chunk] = torch.where(complete, state[:, 0].to(summaries.dtype), summaries[rows, chunk])
        cache.lengths += 1
        return self.gated_output(z, y)
