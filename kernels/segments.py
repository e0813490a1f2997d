"""Document boundaries inside a packed sequence, as every op takes them: `segment_ids`.

`segment_ids` is an integer tensor `[B, T]`, non-decreasing along T, equal for the tokens of
one document. With it, an op's output for each document equals the op run on that document
alone: no token sees another document, and whatever an op counts from the sequence start
(RAT's chunks, S2's blocks, a recurrence's state) it counts from the document's start.
"""

import os

import torch
from torch import Tensor


def check_segment_ids(
    segment_ids: Tensor, batch: int, seq_len: int, op: str, name: str = "segment_ids",
    device: torch.device | None = None,
) -> None:
    """Raise a one-line ValueError unless `segment_ids` is an integer `[batch, seq_len]` tensor (on `device`).

    Whether it is non-decreasing is checked only with LSYS_DEBUG=1 (a device sync otherwise).
    """
    if not isinstance(segment_ids, Tensor) or segment_ids.is_floating_point() or segment_ids.is_complex():
        got = segment_ids.dtype if isinstance(segment_ids, Tensor) else type(segment_ids).__name__
        raise ValueError(f"{op}: {name} must be an integer tensor [B, T], got {got}")
    if tuple(segment_ids.shape) != (batch, seq_len):
        raise ValueError(
            f"{op}: {name} of shape {tuple(segment_ids.shape)} does not match the sequence "
            f"[B, T] = [{batch}, {seq_len}]"
        )
    if device is not None and segment_ids.device != device:
        raise ValueError(f"{op}: {name} are on {segment_ids.device} but the inputs are on {device}")
    if os.environ.get("LSYS_DEBUG") == "1" and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        raise ValueError(f"{op}: {name} must be non-decreasing along T (one run of equal ids per document)")


def document_starts(segment_ids: Tensor) -> Tensor:
    """`[B, T]`: the index of the first token of each token's document (within this sequence)."""
    ids = segment_ids.contiguous()
    return torch.searchsorted(ids, ids, side="left")


def document_ends(segment_ids: Tensor) -> Tensor:
    """`[B, T]`: one past the index of the last token of each token's document (within this sequence)."""
    ids = segment_ids.contiguous()
    return torch.searchsorted(ids, ids, side="right")


def positions_in_document(segment_ids: Tensor, offset: Tensor | int = 0) -> Tensor:
    """`[B, T]` int64: each token's position counted from its document's first token.

    `offset [B]` (or an int): how many tokens of the first document came before this sequence,
    for a piece of a longer one; later documents start inside the piece, so it does not apply.
    """
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    starts = document_starts(segment_ids)
    first_document = segment_ids == segment_ids[:, :1]
    offset = torch.as_tensor(offset, device=segment_ids.device)
    return index - starts + torch.where(first_document, offset.reshape(-1, 1), 0)
