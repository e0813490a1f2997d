"""Multi-device execution: process groups now; ring, Ulysses, RAT-SP and LASP ops to come."""

from parallel.mesh import World, barrier, init_distributed, shutdown

__all__ = ["World", "barrier", "init_distributed", "shutdown"]
