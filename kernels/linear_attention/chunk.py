"""Lightning attention in blocks: the fast torch form of the recurrence in naive.py.

Cut the sequence into blocks of C rows and let S_prev be the state just before a
block. Unrolling the recurrence, row i of the block (0-based) has
    S_i = λ^(i+1) S_prev + Σ_{j<=i} λ^(i-j) k_j^T v_j,
so its output o_i = q_i S_i is the sum of
    intra-block:  [(Q K^T) ⊙ M] V   with M_ij = λ^(i-j) for i >= j, else 0,
    inter-block:  λ^(i+1) q_i S_prev,
and the state after a block of n rows (n = C, or less for a partial last block) is
    S_new = λ^n S_prev + (Λ K)^T V,   Λ = diag(λ^(n-1-j)).
These are TransNormerLLM's λ^i and λ^(B-j) written with 0-based rows. Only the state
chain runs block by block; the products inside blocks are batched over all blocks.

With segment ids the state restarts at each document's first token, so every term above
keeps only what lies in one document: M_ij also needs rows i and j in one document, the
inter-block term needs row i in the document of the token before the block (for the first
block, the initial state's, which is the first token's), and S_new keeps λ^n S_prev only when
the block's last row is still in that document and sums only the rows of the last row's one.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.linear_attention.naive import accumulation_dtype

BLOCK_SIZE = 64  # rows per block: each block costs a C x C score matrix per head


def linear_attention_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: Tensor,
    initial_state: Tensor | None = None,
    segment_ids: Tensor | None = None,
    block_size: int = BLOCK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Blocked form on `[B, T, H, D]` inputs; returns (out `[B, T, H, Dv]`, S_{T-1} `[B, H, Dk, Dv]`)."""
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    dtype = accumulation_dtype(q, k, v)
    num_blocks = -(-seq_len // block_size)
    pad = num_blocks * block_size - seq_len

    def to_blocks(x: Tensor) -> Tensor:
        """[B, T, H, D] -> [B, H, N, C, D]; zero rows fill the last block, so they add nothing."""
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_blocks, block_size, heads, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q_blocks, k_blocks, v_blocks = to_blocks(q), to_blocks(k), to_blocks(v)

    # λ^e as exp(e log λ) with e >= 0: no overflow for any λ in (0, 1], exact 1 at λ = 1,
    # and differentiable in λ.
    log_decay = decay.to(dtype).log()[:, None]  # [H, 1]
    rows = torch.arange(block_size, device=q.device)
    block_len = (seq_len - block_size * torch.arange(num_blocks, device=q.device)).clamp(max=block_size)

    lag = rows[:, None] - rows[None, :]
    decay_mask = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_decay[..., None]), 0.0)  # [H, C, C]
    scores = q_blocks @ k_blocks.transpose(-1, -2) * decay_mask[:, None]  # [B, H, N, C, C]
    # Padded rows get exponent 0 rather than a negative one; their k and v are zero anyway.
    key_decay = torch.exp((block_len[:, None] - 1 - rows).clamp(min=0) * log_decay[..., None])  # [H, N, C]
    block_decay = torch.exp(block_len * log_decay)  # [H, N]
    query_decay = torch.exp((rows + 1) * log_decay)  # [H, C]

    if segment_ids is None:
        out = scores @ v_blocks  # [B, H, N, C, Dv]
        block_kv = (k_blocks * key_decay[..., None]).transpose(-1, -2) @ v_blocks  # [B, H, N, Dk, Dv]
        carries = None
    else:
        # Padding repeats the last id, so padded rows join the last document (their k and v are zero).
        ids = torch.cat([segment_ids, segment_ids[:, -1:].expand(-1, pad)], dim=1)
        ids = ids.view(batch, 1, num_blocks, block_size)  # [B, 1, N, C] against [B, H, N, ...]
        before = torch.cat([ids[:, :, :1, 0], ids[:, :, :-1, -1]], dim=-1)  # id of the token before each block
        scores = scores * (ids[..., :, None] == ids[..., None, :])
        out = scores @ v_blocks
        last_document = (ids == ids[..., -1:])[..., None]  # rows in the block's last document
        block_kv = (k_blocks * key_decay[..., None] * last_document).transpose(-1, -2) @ v_blocks
        carries = ids[..., -1] == before  # [B, 1, N]: the state before the block reaches its end
        query_carries = (ids == before[..., None])[..., None]  # [B, 1, N, C, 1]

    if initial_state is None:
        state = q_blocks.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(dtype)
    states_before = []
    for block in range(num_blocks):
        states_before.append(state)
        kept = block_decay[:, block, None, None] * state
        if carries is not None:
            kept = kept * carries[:, :, block, None, None]
        state = kept + block_kv[:, :, block]

    decayed_q = q_blocks * query_decay[:, None, :, None]
    if carries is not None:
        decayed_q = decayed_q * query_carries
    out = out + decayed_q @ torch.stack(states_before, dim=2)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, num_blocks * block_size, heads, value_dim)
    return out[:, :seq_len].to(v.dtype), state
