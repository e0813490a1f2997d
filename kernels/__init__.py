"""Single-device ops on `[B, T, H, D]` tensors: a pure-torch reference beside each fused kernel."""

from kernels.attention import S2Pattern, attention
from kernels.linear_attention import linear_attention
from kernels.rat import rat
from kernels.rope import apply_rope, rope_angles

__all__ = ["attention", "S2Pattern", "rat", "linear_attention", "apply_rope", "rope_angles"]
