"""What mixers call: each op runs on one device, or sequence-parallel over the current mesh.

With no mesh or sp = 1 these are the kernels/ ops. With sp > 1:
- attention (full or sliding window): ring attention over the sp group (sp_mode=ring),
  Ulysses (sp_mode=ulysses), or Ulysses inside ring (sp_mode=hybrid);
- S2 attention: always Ulysses over the whole sp group, so each rank keeps whole heads,
  each with its own strided share of the context;
- rat: RAT-SP; linear_attention: LASP-2.
With `documents` (parallel/documents.py) every op keeps each packed document to itself.
`backend` (kernels/backend.py: "auto", "torch" or "triton") goes to every kernels/ call they make.
"""

from dataclasses import replace

import torch
from torch import Tensor

import kernels
from kernels import S2Pattern
from parallel.documents import Documents
from parallel.lasp import lasp
from parallel.mesh import sequence_parallel
from parallel.rat_sp import rat_sp
from parallel.ring import ring_attention
from parallel.ulysses import hybrid_attention, ulysses_attention


def local_positions(local_len: int, device: torch.device, documents: Documents | None = None) -> Tensor:
    """RoPE positions of this rank's tokens: global (0..T-1 without sequence parallelism), or `[B, T_local]`
    positions in their documents when `documents` restart positions."""
    if documents is not None and documents.restart_positions:
        return documents.positions
    mesh = sequence_parallel()
    if mesh is None:
        return torch.arange(local_len, device=device)
    return mesh.layout.positions(mesh.sp_rank, local_len * mesh.sp, device=device)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, s2: S2Pattern | None = None,
    documents: Documents | None = None, backend: str = "auto",
) -> Tensor:
    """Causal attention of this rank's tokens over the whole sequence (over their own documents)."""
    mesh = sequence_parallel()
    if mesh is None:
        segment_ids = None if documents is None else documents.local_ids
        return kernels.attention(
            q, k, v, causal=True, window=window, s2=s2, segment_ids=segment_ids, backend=backend
        )
    layout = mesh.layout.kind
    global_ids = None if documents is None else documents.global_ids
    if s2 is not None or mesh.sp_mode == "ulysses":

        def local_attention(q: Tensor, k: Tensor, v: Tensor, head_start: int) -> Tensor:
            pattern = replace(s2, head_start=head_start) if s2 is not None else None
            # Ulysses hands over the whole sequence in order, so its ids are the global ones.
            return kernels.attention(
                q, k, v, causal=True, window=window, s2=pattern, segment_ids=global_ids, backend=backend
            )

        return ulysses_attention(q, k, v, mesh.sp_group, attn=local_attention, layout=layout)
    options = dict(causal=True, window=window, layout=layout, segment_ids=global_ids, backend=backend)
    if mesh.sp_mode == "ring":
        return ring_attention(q, k, v, mesh.sp_group, **options)
    return hybrid_attention(q, k, v, mesh.ulysses_group, mesh.ring_group, **options)


def rat(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int, rope_base: float | None,
    documents: Documents | None = None, backend: str = "auto",
) -> Tensor:
    """The RAT core of this rank's tokens (chunk summaries of earlier ranks included)."""
    mesh = sequence_parallel()
    if mesh is None:
        segment_ids = None if documents is None else documents.local_ids
        return kernels.rat(
            q, k, v, g, chunk_size=chunk_size, rope_base=rope_base, segment_ids=segment_ids, backend=backend
        )
    return rat_sp(
        q, k, v, g, mesh.sp_group, chunk_size=chunk_size, rope_base=rope_base, layout=mesh.layout.kind,
        segment_ids=None if documents is None else documents.global_ids, backend=backend,
    )


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor, documents: Documents | None = None, backend: str = "auto"
) -> Tensor:
    """Decayed linear attention of this rank's tokens (earlier ranks' states included)."""
    mesh = sequence_parallel()
    if mesh is None:
        segment_ids = None if documents is None else documents.local_ids
        return kernels.linear_attention(q, k, v, decay=decay, segment_ids=segment_ids, backend=backend)
    return lasp(
        q, k, v, mesh.sp_group, decay=decay, layout=mesh.layout.kind,
        segment_ids=None if documents is None else documents.global_ids, backend=backend,
    )
