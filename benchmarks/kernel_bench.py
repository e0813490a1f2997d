"""`launch/bench.py kernels`: our Triton kernels side by side with torch's SDPA (flash), flex_attention
and our torch references, forward, backward and both, at a fixed number of tokens per batch.

Each contestant is a function of fresh inputs that returns the op's output; the harness times the
forward alone, then forward+backward with a random upstream gradient (backward = the difference),
and reads the peak memory of one forward+backward above what the inputs take. TFLOP/s counts only
the work a kernel must do: the (query, key) pairs it can see, not the blocks a mask throws away.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from kernels.attention.naive import attention_naive
from kernels.rat.chunk import gated_chunk_scan
from kernels.rope import apply_rope, rope_angles

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Timing:
    forward_ms: float
    backward_ms: float
    total_ms: float
    peak_mib: float


# --- what each op computes: (query, key) pairs seen, and FLOPs -------------------------------------------------


def causal_pairs(seq_len: int) -> int:
    return seq_len * (seq_len + 1) // 2


def s2_pairs(seq_len: int, pattern: kernels.S2Pattern) -> float:
    """Visible pairs of an S2 head, averaged over heads (whole blocks: the diagonal block counts as half)."""
    return pattern.kept_fraction(seq_len) * causal_pairs(seq_len)


def rat_pairs(seq_len: int, chunk_size: int) -> int:
    """Each query sees the summaries of the chunks before its own, plus its own running state."""
    return sum(t // chunk_size + 1 for t in range(seq_len))


def attention_flops(pairs: float, shape: Shape) -> tuple[float, float]:
    """(forward, backward) FLOPs of softmax attention over `pairs` visible pairs per head: 2 matmuls forward, 5 back."""
    forward = 4 * shape.batch * shape.heads * shape.head_dim * pairs
    return forward, 2.5 * forward


def linear_attention_flops(shape: Shape, block_size: int = 64) -> tuple[float, float]:
    """Blocked lightning attention: per block of C rows, C x C scores and C x D outputs intra-block, and
    three D x D products with the state (query side, state update); backward about twice that."""
    per_token = 4 * shape.head_dim * block_size / 2 + 6 * shape.head_dim * shape.head_dim
    forward = shape.batch * shape.heads * shape.seq_len * per_token
    return forward, 2 * forward


# --- the RAT reference path of the paper's code: a scan, flex_attention over the summaries, a merge ------------


def rat_flex_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int, rope_base: float = 10000.0, compiled: bool = True
) -> Tensor:
    """kernels.rat in three unfused passes, as the RAT reference code runs it (torch ops + flex_attention).

    1. the gated scan inside each chunk (all running states kept: [B, T, H, D] twice);
    2. flex_attention of every query over the rotated chunk summaries, block-causal by chunk, with lse;
    3. the merge of each token's own running state into that softmax through the lse.
    """
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    batch, seq_len, heads, head_dim = q.shape
    num_chunks = seq_len // chunk_size
    if num_chunks * chunk_size != seq_len:
        raise ValueError("rat_flex_reference: seq_len must be a multiple of chunk_size")
    dtype = torch.promote_types(q.dtype, g.dtype)
    shape = (batch, num_chunks, chunk_size, heads, head_dim)
    # A log-depth scan, like the associative scan of the reference code (a loop over L would be slower).
    (k_state, v_state), _ = gated_chunk_scan((k.to(dtype).view(shape), v.to(dtype).view(shape)),
                                             g.to(dtype).view(shape))

    cos, sin = rope_angles(torch.arange(num_chunks, device=q.device), head_dim, rope_base)
    q_rot = apply_rope(q.to(dtype).view(shape).transpose(1, 2), cos, sin).transpose(1, 2).reshape(q.shape)
    k_rot = apply_rope(k_state.transpose(1, 2), cos, sin).transpose(1, 2).reshape(q.shape)
    summaries_k = k_rot.view(shape)[:, :, -1]
    summaries_v = v_state[:, :, -1]

    def sees_earlier_chunk(b, h, q_idx, kv_idx):
        return kv_idx < q_idx // chunk_size

    block_mask = create_block_mask(
        sees_earlier_chunk, B=None, H=None, Q_LEN=seq_len, KV_LEN=num_chunks, device=q.device
    )
    attend = torch.compile(flex_attention) if compiled else flex_attention
    cast = q.dtype  # flex_attention runs in the inputs' dtype, like the reference code
    out_s, aux = attend(
        q_rot.to(cast).transpose(1, 2), summaries_k.to(cast).transpose(1, 2), summaries_v.to(cast).transpose(1, 2),
        block_mask=block_mask, return_aux=AuxRequest(lse=True),
    )
    out_s, lse_s = out_s.transpose(1, 2).to(dtype), aux.lse.transpose(1, 2).to(dtype)  # [B, T, H, D], [B, T, H]
    own = (q_rot * k_rot).sum(-1) * head_dim**-0.5  # [B, T, H]
    share = torch.sigmoid(own - lse_s)  # the own state's weight in the merged softmax; 1 where no summary is seen
    out = share[..., None] * v_state.reshape(q.shape) + (1 - share[..., None]) * out_s
    return out.to(v.dtype)


# --- timing ------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn()` in ms after two warm-up calls (compilation, autotuning), synchronised."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_op(run: Callable[..., Tensor], inputs: list[Tensor], device: torch.device, repeats: int) -> Timing:
    """Forward, backward (forward+backward minus forward) and total time of `run(*inputs)`, and its peak memory."""
    upstream = torch.randn_like(run(*inputs))

    def forward() -> Tensor:
        return run(*inputs)

    def forward_backward() -> None:
        torch.autograd.backward(run(*inputs), upstream)
        for t in inputs:
            t.grad = None

    forward_ms = median_ms(forward, device, repeats)
    total_ms = median_ms(forward_backward, device, repeats)
    peak_mib = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward()
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return Timing(forward_ms, total_ms - forward_ms, total_ms, peak_mib)


def random_inputs(shape: Shape, count: int, *, scale: float = 1.0) -> list[Tensor]:
    size = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    return [
        (torch.randn(size, device=shape.device) * scale).to(shape.dtype).requires_grad_() for _ in range(count)
    ]


def gate(shape: Shape) -> Tensor:
    """A forget gate in (0, 1), fp32 as the model keeps it."""
    size = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    return torch.sigmoid(torch.randn(size, device=shape.device) + 2).requires_grad_()


# --- contestants -------------------------------------------------------------------------------------------------


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """torch SDPA, causal, restricted to the flash backend on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def flex(mask_mod: Callable, shape: Shape, *, compiled: bool) -> Callable[..., Tensor]:
    """flex_attention with the block mask of `mask_mod` (built once, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(
        mask_mod, B=None, H=shape.heads, Q_LEN=shape.seq_len, KV_LEN=shape.seq_len, device=shape.device
    )
    attend = torch.compile(flex_attention) if compiled else flex_attention

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask).transpose(1, 2)

    return run


def causal_mask(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def s2_mask(pattern: kernels.S2Pattern) -> Callable:
    """The S2 rule of kernels/attention/s2.py as a flex_attention mask_mod."""

    def mask(b, h, q_idx, kv_idx):
        q_block, k_block = q_idx // pattern.block_size, kv_idx // pattern.block_size
        local = q_block - k_block < pattern.local_blocks
        strided = (k_block + (h + pattern.head_start) * pattern.step) % pattern.vert_stride == 0
        return (kv_idx <= q_idx) & (local | strided)

    return mask


def attention_reference(pattern: kernels.S2Pattern | None) -> Callable[..., Tensor]:
    """naive.py's chunked causal attention (S2 when a pattern is given), without the SDPA shortcut."""

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scale = q.shape[-1] ** -0.5
        return attention_naive(q, k, v, causal=True, window=None, s2=pattern, q_start=0, k_start=0, scale=scale)[0]

    return run


def contestants(op: str, shape: Shape, *, chunk_size: int, pattern: kernels.S2Pattern, compiled: bool,
                reference_max_len: int) -> dict[str, Callable[..., Tensor]]:
    """Name -> function of the op's inputs, for the op `op` at `shape`."""
    with_reference = shape.seq_len <= reference_max_len
    if op == "attention":
        runs = {
            "lsys triton": lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="triton"),
            "torch SDPA (flash)": sdpa,
            "torch flex_attention": flex(causal_mask, shape, compiled=compiled),
        }
        if with_reference:
            runs["lsys torch reference"] = attention_reference(None)
        return runs
    if op == "s2":
        runs = {
            "lsys triton": lambda q, k, v: kernels.attention(q, k, v, causal=True, s2=pattern, backend="triton"),
            "lsys triton dense": lambda q, k, v: kernels.attention(q, k, v, causal=True, backend="triton"),
            "torch flex_attention": flex(s2_mask(pattern), shape, compiled=compiled),
        }
        if with_reference:
            runs["lsys torch reference"] = attention_reference(pattern)
        return runs
    if op == "rat":
        runs = {
            "lsys triton": lambda q, k, v, g: kernels.rat(q, k, v, g, chunk_size=chunk_size, backend="triton"),
            "scan + flex_attention + merge": lambda q, k, v, g: rat_flex_reference(
                q, k, v, g, chunk_size=chunk_size, compiled=compiled
            ),
            "lsys triton causal attention": lambda q, k, v, g: kernels.attention(
                q, k, v, causal=True, backend="triton"
            ),
        }
        if with_reference:
            runs["lsys torch reference"] = lambda q, k, v, g: kernels.rat(
                q, k, v, g, chunk_size=chunk_size, backend="torch"
            )
        return runs
    if op == "linear_attention":
        decay = torch.full((shape.heads,), 0.99, device=shape.device)
        return {
            "lsys triton": lambda q, k, v: kernels.linear_attention(q, k, v, decay=decay, backend="triton"),
            "lsys torch reference": lambda q, k, v: kernels.linear_attention(q, k, v, decay=decay, backend="torch"),
        }
    raise ValueError(f"unknown kernel benchmark op {op!r}")


def inputs_for(op: str, shape: Shape) -> list[Tensor]:
    if op == "rat":
        return random_inputs(shape, 3) + [gate(shape)]
    # Linear attention has no softmax to normalise its sums: small inputs keep bf16 in range at 128K.
    return random_inputs(shape, 3, scale=0.1 if op == "linear_attention" else 1.0)


def flops(op: str, shape: Shape, *, chunk_size: int, pattern: kernels.S2Pattern) -> dict[str, tuple[float, float]]:
    """Name -> (forward, backward) FLOPs, for contestants whose work differs from the op's own."""
    dense = attention_flops(causal_pairs(shape.seq_len), shape)
    if op == "attention":
        return {"*": dense}
    if op == "s2":
        return {"*": attention_flops(s2_pairs(shape.seq_len, pattern), shape), "lsys triton dense": dense}
    if op == "rat":
        rat = attention_flops(rat_pairs(shape.seq_len, chunk_size), shape)
        return {"*": rat, "lsys triton causal attention": dense}
    return {"*": linear_attention_flops(shape)}


def bench_op(op: str, shape: Shape, *, chunk_size: int, pattern: kernels.S2Pattern, compiled: bool,
             reference_max_len: int, repeats: int) -> list[dict]:
    """One row per contestant: times, TFLOP/s of forward+backward, tokens/s, peak memory (or the error it hit)."""
    rows = []
    work = flops(op, shape, chunk_size=chunk_size, pattern=pattern)
    runs = contestants(op, shape, chunk_size=chunk_size, pattern=pattern, compiled=compiled,
                       reference_max_len=reference_max_len)
    for name, run in runs.items():
        torch.manual_seed(0)
        inputs = inputs_for(op, shape)
        try:
            timing = time_op(run, inputs, shape.device, repeats)
        except (RuntimeError, ValueError, NotImplementedError) as error:  # out of memory, a backend that is missing
            rows.append({"op": op, "contestant": name, "seq_len": shape.seq_len, "error": str(error).splitlines()[0]})
            continue
        finally:
            del inputs
            if shape.device.type == "cuda":
                torch.cuda.empty_cache()
        forward, backward = work.get(name, work["*"])
        rows.append({
            "op": op, "contestant": name, "seq_len": shape.seq_len, "batch": shape.batch,
            "forward_ms": timing.forward_ms, "backward_ms": timing.backward_ms, "total_ms": timing.total_ms,
            "tflops": (forward + backward) / (timing.total_ms * 1e-3) / 1e12,
            "tokens_per_s": shape.batch * shape.seq_len / (timing.total_ms * 1e-3),
            "peak_mib": timing.peak_mib,
        })
    return rows


def kernel_table(rows: list[dict], op: str, baseline: str) -> str:
    """A markdown table of one op's rows, with each contestant's speed-up over `baseline` (fwd+bwd)."""
    lines = [
        "| T | B | contestant | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | tokens/s | peak MiB | vs " + baseline + " |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq_len in sorted({r["seq_len"] for r in rows if r["op"] == op}):
        group = [r for r in rows if r["op"] == op and r["seq_len"] == seq_len]
        base = next((r for r in group if r["contestant"] == baseline and "error" not in r), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {_length(seq_len)} | | {r['contestant']} | {r['error']} |||||||")
                continue
            ratio = f"{base['total_ms'] / r['total_ms']:.2f}x" if base else "n/a"
            lines.append(
                f"| {_length(seq_len)} | {r['batch']} | {r['contestant']} | {r['forward_ms']:.2f} "
                f"| {r['backward_ms']:.2f} | {r['total_ms']:.2f} | {r['tflops']:.1f} | {r['tokens_per_s']:,.0f} "
                f"| {r['peak_mib']:,.0f} | {ratio} |"
            )
    return "\n".join(lines)


def _length(seq_len: int) -> str:
    return f"{seq_len // 1024}K" if seq_len % 1024 == 0 else str(seq_len)


def batch_for(tokens: int, seq_len: int) -> int:
    """Batch size that keeps B*T at `tokens` (at least one sequence)."""
    return max(1, tokens // seq_len)


def default_lengths() -> list[int]:
    return [2**i * 1024 for i in range(1, 8)]  # 2K ... 128K
