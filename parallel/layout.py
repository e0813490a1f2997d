"""How a sequence is split over the sequence-parallel ranks.

A rank holds one or more pieces of the sequence, concatenated along the time axis; each
piece is a contiguous run of global positions. Every op works from the pieces' global
starts, so the same code serves any layout:
- contiguous: rank r holds positions [r*T/P, (r+1)*T/P).
- zigzag: the sequence is cut into 2P equal chunks and rank r holds chunks r and 2P-1-r,
  so every rank gets the same share of causal attention work.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Piece:
    start: int  # global position of the piece's first token
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class SequenceLayout:
    kind: str  # "contiguous" | "zigzag"
    world_size: int  # sequence-parallel ranks

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown sequence layout {self.kind!r}; choose one of {LAYOUTS}")
        if self.world_size < 1:
            raise ValueError(f"sequence-parallel world size must be positive, got {self.world_size}")

    @property
    def pieces_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    def unit(self) -> int:
        """The sequence length must be a multiple of this (P, or 2P for zigzag)."""
        return self.world_size * self.pieces_per_rank

    def pieces(self, rank: int, seq_len: int) -> list[Piece]:
        """The pieces rank `rank` holds of a sequence of `seq_len` tokens, in their local order."""
        if seq_len % self.unit():
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {self.unit()} "
                f"({self.kind} layout over {self.world_size} ranks)"
            )
        size = seq_len // self.unit()
        if self.kind == "contiguous":
            return [Piece(rank * size, size)]
        return [Piece(rank * size, size), Piece((2 * self.world_size - 1 - rank) * size, size)]

    def positions(self, rank: int, seq_len: int, device: torch.device | None = None) -> Tensor:
        """Global positions of rank `rank`'s local tokens, in local order."""
        return torch.cat([torch.arange(p.start, p.end, device=device) for p in self.pieces(rank, seq_len)])

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """Rank `rank`'s local part of a full sequence `x` (time along `dim`)."""
        return x.index_select(dim, self.positions(rank, x.shape[dim], device=x.device))

    def unshard(self, parts: list[Tensor], dim: int = 1) -> Tensor:
        """The full sequence from every rank's local part (the inverse of `shard`)."""
        seq_len = sum(part.shape[dim] for part in parts)
        order = torch.cat([self.positions(rank, seq_len) for rank in range(self.world_size)])
        gathered = torch.cat(parts, dim=dim)
        return gathered.index_select(dim, torch.argsort(order).to(gathered.device))
