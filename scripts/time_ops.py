"""Forward+backward seconds of each op (torch backends, fp32, one thread) in the checkout at TREE, as JSON.

For A/B timings of two checkouts side by side, alternating processes:
    git worktree add /tmp/before HEAD~1
    for i in 1 2; do for tree in /tmp/before .; do python scripts/time_ops.py $tree 8192; done; done
"""

import json
import sys
import time
from pathlib import Path

if len(sys.argv) != 3:
    sys.exit(__doc__)
sys.path.insert(0, str(Path(sys.argv[1]).resolve()))  # the checkout's kernels, not the installed ones

import torch  # noqa: E402

import kernels  # noqa: E402

torch.set_num_threads(1)
seq_len = int(sys.argv[2])
generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, seq_len, 8, 32, generator=generator, requires_grad=True) for _ in range(3))
g = torch.rand(1, seq_len, 8, 32, generator=generator).clamp(0.05, 0.95).requires_grad_()
decay = torch.full((8,), 0.99)
s2 = kernels.S2Pattern(block_size=64, local_blocks=16, vert_stride=8, num_heads=8)
ops = {
    "attention": lambda: kernels.attention(q, k, v),
    "window": lambda: kernels.attention(q, k, v, window=1024),
    "s2": lambda: kernels.attention(q, k, v, s2=s2),
    "rat": lambda: kernels.rat(q, k, v, g, chunk_size=16),
    "linear_attention": lambda: kernels.linear_attention(q, k, v, decay=decay),
}
medians = {}
for name, op in ops.items():
    op().sum().backward()  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        op().sum().backward()
        times.append(time.perf_counter() - start)
    medians[name] = sorted(times)[2]
print(json.dumps({"tree": sys.argv[1], "seq_len": seq_len, "seconds": medians}))
