"""Multi-device execution: the dp x sp mesh, sequence layouts, and sequence-parallel ops.

Mixers call `attention`, `rat`, `linear_attention` and `local_positions` (parallel/dispatch.py),
which run the kernels/ op on one device or the sequence-parallel op over the current mesh.
"""

from parallel.comm import comm_stats, reset_comm_stats
from parallel.dispatch import attention, linear_attention, local_positions, rat
from parallel.documents import Documents, documents
from parallel.lasp import lasp
from parallel.layout import Piece, SequenceLayout
from parallel.mesh import (
    Mesh, World, barrier, broadcast_from_main, current_mesh, init_distributed, init_mesh, sequence_parallel, shutdown,
)
from parallel.rat_sp import rat_sp
from parallel.ring import ring_attention, ring_attention_pieces
from parallel.ulysses import hybrid_attention, ulysses_attention

__all__ = [
    "Documents", "Mesh", "Piece", "SequenceLayout", "World", "attention", "barrier", "broadcast_from_main",
    "comm_stats", "current_mesh", "documents", "hybrid_attention", "init_distributed", "init_mesh", "lasp",
    "linear_attention", "local_positions", "rat", "rat_sp", "reset_comm_stats", "ring_attention",
    "ring_attention_pieces", "sequence_parallel", "shutdown", "ulysses_attention",
]
