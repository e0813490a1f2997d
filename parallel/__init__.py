"""Multi-device execution: the dp x sp mesh, sequence layouts, and sequence-parallel ops."""

from parallel.comm import comm_stats, reset_comm_stats
from parallel.layout import Piece, SequenceLayout
from parallel.mesh import Mesh, World, barrier, current_mesh, init_distributed, init_mesh, sequence_parallel, shutdown

__all__ = [
    "Mesh", "Piece", "SequenceLayout", "World", "barrier", "comm_stats", "current_mesh", "init_distributed",
    "init_mesh", "reset_comm_stats", "sequence_parallel", "shutdown",
]
