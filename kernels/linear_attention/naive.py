"""Lightning attention as a plain recurrence: the readable definition every backend must match.

Per head h, with decay λ_h in (0, 1] and the state S_{-1} given (zeros by default),
    S_t = λ_h S_{t-1} + k_t^T v_t        (a [Dk, Dv] matrix; it includes token t)
    o_t = q_t S_t
with no scale, softmax or normalisation. λ = 1 is plain causal linear attention. With
segment ids (kernels/segments.py) the state restarts from zero at each document's first
token (S_{t-1} is dropped where the id changes); S_{-1} belongs to the first document.
"""

import torch
from torch import Tensor


def accumulation_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The dtype the state is kept in: float32 for half inputs, float64 for float64 ones."""
    inputs = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return torch.promote_types(inputs, torch.float32)


def linear_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor, initial_state: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token at a time on `[B, T, H, D]` inputs; returns (out `[B, T, H, Dv]`, S_{T-1} `[B, H, Dk, Dv]`)."""
    batch, seq_len, heads, key_dim = k.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    dtype = accumulation_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    decay = decay.to(dtype)[:, None, None]  # [H, 1, 1] against the state [B, H, Dk, Dv]
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(dtype)
    outs = []
    for t in range(seq_len):
        if segment_ids is not None and t > 0:
            new_document = (segment_ids[:, t] != segment_ids[:, t - 1])[:, None, None, None]
            state = torch.where(new_document, 0.0, state)
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, dim=1).to(out_dtype), state
