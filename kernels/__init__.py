"""Single-device ops on `[B, T, H, D]` tensors: a pure-torch reference beside each fused kernel."""

from kernels.rat import rat
from kernels.rope import apply_rope, rope_angles

__all__ = ["rat", "apply_rope", "rope_angles"]
