"""LASP-2: sequence parallelism for lightning attention by all-gathering piece states.

Linear attention carries the whole past in one `[Dk, Dv]` state per head, so a piece of
the sequence needs from the rest only the state just before its first token. Unrolling
`S_t = λ S_{t-1} + k_t^T v_t`, that state is a decay-weighted sum of every earlier piece's
state from a zero start: piece e ending at global position end_e contributes
λ^(s - end_e) S_e to the piece starting at s, with S_e = Σ_{t in e} λ^(end_e - 1 - t) k_t^T v_t.

Per call, every rank computes its pieces' zero-start states, all-gathers them once (op
"lasp"), sums the earlier ones into each piece's initial state, and runs
`kernels.linear_attention` on each piece from that state. Backward mirrors it: the
all-gather's autograd reduce-scatters the state gradients to their owners.

With the whole sequence's segment ids the state restarts at every document's first token:
a piece's zero-start state sums only the tokens of the document its last token is in, and a
later piece takes it up only if its first token is still in that document.
"""

import torch
import torch.distributed as dist
from torch import Tensor

import kernels
from kernels.linear_attention.naive import accumulation_dtype
from parallel.comm import all_gather
from parallel.layout import SequenceLayout


def _decay_powers(log_decay: Tensor, exponents: Tensor) -> Tensor:
    """λ_h^e as exp(e log λ_h), `[*exponents.shape, H]`: no overflow for e >= 0 and exact at λ = 1."""
    return torch.exp(exponents[..., None] * log_decay)


def lasp(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, *, decay: Tensor, layout: str = "zigzag",
    segment_ids: Tensor | None = None, backend: str = "auto",
) -> Tensor:
    """Lightning attention on this rank's `[B, T_local, H, D]` tokens of a sequence split over `group` by `layout`.

    `segment_ids [B, T]`: the whole sequence's document ids, on every rank (parallel/documents.py).
    `backend`: that of every `kernels.linear_attention` call (kernels/backend.py).

    Each rank sends (P-1) * pieces * B * H * Dk * Dv elements forward (the same backward),
    whatever the length: pieces = 2 for zigzag, 1 for contiguous; the elements are the
    state's dtype (fp32 for half inputs, as in the single-device kernel).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"lasp: q, k, v must be [B, T_local, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]) or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"lasp: q, k, v must agree on B, T_local, H (and q, k on Dk), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    heads = q.shape[2]
    if not isinstance(decay, Tensor) or decay.shape != (heads,):
        got = tuple(decay.shape) if isinstance(decay, Tensor) else repr(decay)
        raise ValueError(f"lasp: decay must be a tensor of shape [H] = [{heads}], got {got}")
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        # One rank holds the whole sequence, and both layouts keep it in order: one kernel call.
        return kernels.linear_attention(q, k, v, decay=decay, segment_ids=segment_ids, backend=backend)

    local_len = q.shape[1]
    sequence = SequenceLayout(layout, world)
    pieces = sequence.pieces(dist.get_rank(group), local_len * world)
    if segment_ids is not None and tuple(segment_ids.shape) != (q.shape[0], local_len * world):
        raise ValueError(
            f"lasp: segment_ids {tuple(segment_ids.shape)} must be the whole sequence's [B, T] = "
            f"[{q.shape[0]}, {local_len * world}]"
        )
    dtype = accumulation_dtype(q, k, v)
    log_decay = decay.to(dtype).log()  # [H]

    lengths = [piece.length for piece in pieces]
    q_pieces, k_pieces, v_pieces = (x.split(lengths, dim=1) for x in (q, k, v))
    # The zero-start state needs no output, so it is one weighted product rather than a kernel call.
    local_states = []
    for piece, k_piece, v_piece in zip(pieces, k_pieces, v_pieces):
        key_decay = _decay_powers(log_decay, torch.arange(piece.length - 1, -1, -1, device=q.device, dtype=dtype))
        if segment_ids is None:
            state = torch.einsum("bthk,th,bthv->bhkv", k_piece.to(dtype), key_decay, v_piece.to(dtype))
        else:  # only the document of the piece's last token reaches past it
            ids = segment_ids[:, piece.start : piece.end]
            key_weights = key_decay * (ids == ids[:, -1:])[..., None]  # [B, t, H]
            state = torch.einsum("bthk,bth,bthv->bhkv", k_piece.to(dtype), key_weights, v_piece.to(dtype))
        local_states.append(state)
    gathered = all_gather(torch.stack(local_states), group, "lasp")  # [P, pieces, B, H, Dk, Dv]

    # Global end of every gathered state, in the gathered order [P, pieces].
    ends = torch.tensor(
        [[piece.end for piece in sequence.pieces(rank, local_len * world)] for rank in range(world)],
        device=q.device, dtype=dtype,
    )
    outputs = []
    for piece, q_piece, k_piece, v_piece in zip(pieces, q_pieces, k_pieces, v_pieces):
        # States of pieces ending at or before this start count with λ^(start - end); later ones
        # with weight 0, which keeps the gathered states in every rank's graph (even where no
        # earlier piece exists), so every rank takes part in the backward reduce-scatter.
        lag = piece.start - ends
        weights = torch.where((lag >= 0)[..., None], _decay_powers(log_decay, lag.clamp(min=0)), 0.0)  # [P, pieces, H]
        ids = None
        if segment_ids is None:
            initial_state = torch.einsum("rnh,rnbhkv->bhkv", weights, gathered)
        else:
            ids = segment_ids[:, piece.start : piece.end]
            # A state counts only within one document: that of its last token and this piece's first.
            last_ids = segment_ids[:, ends.long().clamp(min=1) - 1].permute(1, 2, 0)  # [P, pieces, B]
            row_weights = weights[:, :, None] * (last_ids == ids[:, 0])[..., None]  # [P, pieces, B, H]
            initial_state = torch.einsum("rnbh,rnbhkv->bhkv", row_weights, gathered)
        outputs.append(kernels.linear_attention(
            q_piece, k_piece, v_piece, decay=decay, initial_state=initial_state, segment_ids=ids, backend=backend
        ))
    return torch.cat(outputs, dim=1)
