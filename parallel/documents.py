"""Document boundaries of packed sequences as the mixers see them: `Documents`, built once per forward.

Each rank holds the segment ids of its own tokens (kernels/segments.py), sliced like the
tokens. The sequence-parallel ops also need the whole sequence's ids, to know where a document
that straddles ranks began: they are all-gathered once per forward pass (B x T integers, next
to nothing beside the activations) and shared by every layer.
"""

from dataclasses import dataclass

from torch import Tensor

from kernels.segments import positions_in_document
from parallel.comm import all_gather
from parallel.mesh import sequence_parallel


@dataclass(frozen=True)
class Documents:
    local_ids: Tensor  # [B, T_local]: this rank's tokens' segment ids
    global_ids: Tensor  # [B, T]: the whole sequence's, in global order (local_ids without sequence parallelism)
    positions: Tensor  # [B, T_local]: each local token's position in its document
    restart_positions: bool  # whether RoPE positions count from each document's start


def documents(segment_ids: Tensor, *, restart_positions: bool = True) -> Documents:
    """The `Documents` of this rank's `[B, T_local]` segment ids (a collective under sequence parallelism)."""
    mesh = sequence_parallel()
    if mesh is None:
        return Documents(segment_ids, segment_ids, positions_in_document(segment_ids), restart_positions)
    gathered = all_gather(segment_ids, mesh.sp_group, "segment_ids")  # [P, B, T_local]
    global_ids = mesh.layout.unshard(list(gathered), dim=1)
    local_positions = mesh.layout.positions(mesh.sp_rank, global_ids.shape[1], device=segment_ids.device)
    positions = positions_in_document(global_ids).index_select(1, local_positions)
    return Documents(segment_ids, global_ids, positions, restart_positions)
