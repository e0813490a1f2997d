"""RAT core (`kernels.rat`, torch backend) against an independent loop reference.

The reference `_rat_loops` is written straight from ARCHITECTURE.md §5 ("RAT" and
"Conventions every backend shares"): an explicit token-by-token gated scan that
restarts at every chunk boundary, rotate-half RoPE at the *global chunk index*,
and, for every token, one softmax (scale D^-1/2) over the chunk summaries that
precede it (prefix summaries first, then earlier local chunks) plus its own
running state.  It loops over tokens and chunks on purpose; only batch and heads
are vectorised.

Tolerances:
  * float64 vs float64: relative error <= 1e-10 (``F64_TOL``), where the relative
    error is always ``_rel_err`` below: max|a - b| / max|b| (relative max-abs).
  * float32 kernel vs float64 reference: <= 1e-5 (``F32_TOL``, same metric).
"""

from __future__ import annotations

import pytest
import torch

import kernels

F64_TOL = 1e-10  # float64 kernel vs float64 reference (relative max-abs error)
F32_TOL = 1e-5   # float32 kernel vs float64 reference (relative max-abs error)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The single error metric of this file: max|a - b| / max|b| (b = reference)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / denom).item()


# --------------------------------------------------------------------------- #
# Independent reference, from the equations
# --------------------------------------------------------------------------- #
def _rope(x: torch.Tensor, pos: float, base: float | None) -> torch.Tensor:
    """Rotate-half RoPE of x [..., D] at one (scalar) position.

    angle_i = pos * base^(-2i/D), i < D/2; out = [x1 cos - x2 sin, x2 cos + x1 sin].
    """
    if base is None:
        return x
    D = x.shape[-1]
    half = D // 2
    i = torch.arange(half, dtype=torch.float64)
    ang = float(pos) * torch.pow(torch.tensor(float(base), dtype=torch.float64), -2.0 * i / D)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _scan(k, v, g, L):
    """Chunk-restarting gated scan; returns running states k~, v~ [B, T, H, D]."""
    B, T, H, D = v.shape
    ks, vs = [], []
    kt = vt = None
    for t in range(T):
        if t % L == 0:  # state restarts at zero at the start of every chunk
            kt = torch.zeros_like(k[:, 0])
            vt = torch.zeros_like(v[:, 0])
        gt = g[:, t]
        kt = gt * kt + (1 - gt) * k[:, t]
        vt = gt * vt + (1 - gt) * v[:, t]
        ks.append(kt)
        vs.append(vt)
    return torch.stack(ks, 1), torch.stack(vs, 1)


def _summaries(k, v, g, L, base, chunk_start=0):
    """Final states of every *full* chunk, keys rotated by their global chunk index.

    Returns (sum_k, sum_v) [B, n_full_chunks, H, D].
    """
    ks, vs = _scan(k, v, g, L)
    T = v.shape[1]
    sk, sv = [], []
    for c in range(T // L):
        last = c * L + L - 1
        sk.append(_rope(ks[:, last], chunk_start + c, base))
        sv.append(vs[:, last])
    if not sk:
        e = v[:, :0]
        return e, e
    return torch.stack(sk, 1), torch.stack(sv, 1)


def _rat_loops(q, k, v, g, L, base, prefix_k=None, prefix_v=None, chunk_start=0, return_lse=False):
    """RAT core with explicit loops over tokens (scan) and chunks (attention); also lse [B, H, T] if asked."""
    B, T, H, D = v.shape
    scale = D ** -0.5
    ks, vs = _scan(k, v, g, L)
    sum_k, sum_v = _summaries(k, v, g, L, base, chunk_start)  # [B, n_full, H, D]
    n_chunks = (T + L - 1) // L
    out = [None] * T
    lse = [None] * T
    for c in range(n_chunks):
        gc = chunk_start + c
        mem_k = [sum_k[:, j] for j in range(c)]  # earlier local chunks
        mem_v = [sum_v[:, j] for j in range(c)]
        if prefix_k is not None:
            mem_k = [prefix_k[:, j] for j in range(prefix_k.shape[1])] + mem_k
            mem_v = [prefix_v[:, j] for j in range(prefix_v.shape[1])] + mem_v
        for t in range(c * L, min(T, (c + 1) * L)):
            qt = _rope(q[:, t], gc, base)                 # [B, H, D]
            own_k = _rope(ks[:, t], gc, base)
            keys = torch.stack(mem_k + [own_k], 1)        # [B, M+1, H, D]
            vals = torch.stack(mem_v + [vs[:, t]], 1)
            s = (keys * qt[:, None]).sum(-1) * scale      # [B, M+1, H]
            p = torch.softmax(s, dim=1)
            out[t] = (p[..., None] * vals).sum(1)         # [B, H, D]
            lse[t] = torch.logsumexp(s, dim=1)           # [B, H]
    if return_lse:
        return torch.stack(out, 1), torch.stack(lse, -1)
    return torch.stack(out, 1)


def _causal_rope_attention(q, k, v, base, pos0=0):
    """Plain causal softmax attention with per-token RoPE at positions pos0..pos0+T-1."""
    B, T, H, D = q.shape
    qr = torch.stack([_rope(q[:, t], pos0 + t, base) for t in range(T)], 1)
    kr = torch.stack([_rope(k[:, t], pos0 + t, base) for t in range(T)], 1)
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) * D ** -0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _inputs(B, T, H, D, n_prefix=0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    g = torch.sigmoid(torch.randn(B, T, H, D, generator=gen, dtype=dtype))
    pk = pv = None
    if n_prefix:
        pk = torch.randn(B, n_prefix, H, D, generator=gen, dtype=dtype)
        pv = torch.randn(B, n_prefix, H, D, generator=gen, dtype=dtype)
    return q, k, v, g, pk, pv


def _kernel(q, k, v, g, L, base, pk=None, pv=None, cs=0, backend="torch"):
    return kernels.rat(q, k, v, g, chunk_size=L, rope_base=base, prefix_k=pk,
                       prefix_v=pv, chunk_start=cs, backend=backend)


def _fwd_and_grads(fn, tensors, seed=123):
    """Run fn on leaf copies of `tensors` (None entries skipped); return out and grads."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, grad_outputs=gout)
    return out, grads


# (B, T, H, D, L, rope_base, n_prefix, chunk_start)
CASES = [
    pytest.param(2, 32, 2, 16, 8, 10000.0, 0, 0, id="T32-L8-multiple"),
    pytest.param(2, 37, 3, 16, 8, 10000.0, 0, 0, id="T37-L8-partial"),
    pytest.param(2, 5, 2, 32, 8, 10000.0, 0, 0, id="T5-L8-only-partial"),
    pytest.param(2, 12, 3, 32, 1, 10000.0, 0, 0, id="T12-L1-attention"),
    pytest.param(2, 32, 3, 32, 8, None, 0, 0, id="T32-L8-norope"),
    pytest.param(2, 37, 2, 16, 8, None, 0, 0, id="T37-L8-norope-partial"),
    pytest.param(2, 29, 2, 16, 4, 100.0, 0, 0, id="T29-L4-base100"),
    pytest.param(2, 40, 2, 16, 6, 10000.0, 2, 5, id="T40-L6-not-a-power-of-two-prefix2"),
    pytest.param(1, 23, 2, 16, 11, 10000.0, 0, 0, id="T23-L11-odd"),
    pytest.param(2, 16, 2, 16, 16, 10000.0, 0, 0, id="T16-L16-rnn"),
    pytest.param(2, 24, 2, 16, 8, 10000.0, 3, 3, id="T24-L8-prefix3"),
    pytest.param(2, 21, 3, 32, 4, 10000.0, 2, 2, id="T21-L4-prefix2-partial"),
    pytest.param(2, 16, 2, 16, 8, None, 2, 2, id="T16-L8-prefix2-norope"),
    pytest.param(2, 10, 2, 16, 1, 100.0, 3, 3, id="T10-L1-prefix3-base100"),
    pytest.param(2, 20, 2, 16, 8, 10000.0, 0, 4, id="T20-L8-chunkstart4-noprefix"),
]


# --------------------------------------------------------------------------- #
# 1-2. Forward and gradients against the loop reference (float64)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("B,T,H,D,L,base,n_prefix,cs", CASES)
def test_matches_loop_reference_fwd_bwd(B, T, H, D, L, base, n_prefix, cs):
    q, k, v, g, pk, pv = _inputs(B, T, H, D, n_prefix)
    tensors = [q, k, v, g, pk, pv]
    out_k, grads_k = _fwd_and_grads(
        lambda q, k, v, g, pk, pv: _kernel(q, k, v, g, L, base, pk, pv, cs), tensors)
    out_r, grads_r = _fwd_and_grads(
        lambda q, k, v, g, pk, pv: _rat_loops(q, k, v, g, L, base, pk, pv, cs), tensors)

    assert out_k.shape == (B, T, H, D)
    assert out_k.dtype == torch.float64
    assert _rel_err(out_k, out_r) <= F64_TOL, f"forward rel err {_rel_err(out_k, out_r):.3e}"
    names = ["q", "k", "v", "g", "prefix_k", "prefix_v"][: len(grads_r)]
    assert len(grads_k) == len(grads_r)
    for name, gk, gr in zip(names, grads_k, grads_r):
        err = _rel_err(gk, gr)
        assert err <= F64_TOL, f"grad {name} rel err {err:.3e}"


@pytest.mark.parametrize("B,T,H,D,L,base,n_prefix,cs", CASES)
def test_lse_and_summaries_match_loop_reference_fwd_bwd(B, T, H, D, L, base, n_prefix, cs):
    """return_lse and return_summaries: every output and the gradients through all of them at once."""
    q, k, v, g, pk, pv = _inputs(B, T, H, D, n_prefix)

    def outputs_of(run):
        def outputs(q, k, v, g, pk, pv):
            return torch.cat([x.flatten() for x in run(q, k, v, g, pk, pv)])
        return outputs

    def kernel(q, k, v, g, pk, pv):
        return kernels.rat(q, k, v, g, chunk_size=L, rope_base=base, prefix_k=pk, prefix_v=pv, chunk_start=cs,
                           return_lse=True, return_summaries=True, backend="torch")

    def loops(q, k, v, g, pk, pv):
        out, lse = _rat_loops(q, k, v, g, L, base, pk, pv, cs, return_lse=True)
        return (out, lse, *_summaries(k, v, g, L, base, cs))

    out_k, lse_k, sk_k, sv_k = kernel(q, k, v, g, pk, pv)
    out_r, lse_r, sk_r, sv_r = loops(q, k, v, g, pk, pv)
    assert lse_k.shape == (B, H, T) and sk_k.shape == sv_k.shape == (B, T // L, H, D)
    for name, a, b in (("out", out_k, out_r), ("lse", lse_k, lse_r), ("summary_k", sk_k, sk_r),
                       ("summary_v", sv_k, sv_r)):
        if b.numel():
            assert _rel_err(a, b) <= F64_TOL, name
    tensors = [q, k, v, g, pk, pv]
    _, grads_k = _fwd_and_grads(outputs_of(kernel), tensors)
    _, grads_r = _fwd_and_grads(outputs_of(loops), tensors)
    for name, a, b in zip(["q", "k", "v", "g", "prefix_k", "prefix_v"], grads_k, grads_r):
        assert _rel_err(a, b) <= F64_TOL, f"grad {name}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loop_free_scan_is_exact_for_gates_at_the_ends_of_the_range(dtype):
    """Gates near 0 multiply to far below fp32's range within a chunk; the scan neither divides nor exponentiates."""
    B, T, H, D, L = 1, 64, 2, 16, 16
    q, k, v, _, _, _ = _inputs(B, T, H, D, seed=4)
    gen = torch.Generator().manual_seed(4)
    g = torch.sigmoid(40 * torch.randn(B, T, H, D, generator=gen, dtype=torch.float64))  # ~1e-17 .. 1 - 1e-17
    assert g.min() < 1e-12 and g.prod(dim=1).min() == 0  # a chunk's gates multiply to nothing
    tensors = [t.to(dtype) for t in (q, k, v, g)]
    out_k, grads_k = _fwd_and_grads(lambda q, k, v, g: _kernel(q, k, v, g, L, 10000.0), tensors)
    out_r, grads_r = _fwd_and_grads(lambda q, k, v, g: _rat_loops(q, k, v, g, L, 10000.0),
                                    [t.double() for t in tensors])
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert torch.isfinite(out_k).all() and _rel_err(out_k, out_r) <= tol
    for name, a, b in zip("qkvg", grads_k, grads_r):
        assert torch.isfinite(a).all() and _rel_err(a, b) <= tol, f"grad {name}"


def test_long_sequences_run_in_query_blocks_with_the_same_result():
    """Past one query block (kernels.rat.chunk.QUERY_BLOCK tokens) the blocks recompute in backward."""
    from kernels.rat import chunk
    from kernels.rat.naive import rat_naive

    B, T, H, D, L = 1, 3 * chunk.QUERY_BLOCK + 24, 1, 8, 8
    q, k, v, g, pk, pv = _inputs(B, T, H, D, n_prefix=3, seed=8)
    tensors = [q, k, v, g, pk, pv]
    out_k, grads_k = _fwd_and_grads(lambda *t: _kernel(*t[:4], L, 10000.0, t[4], t[5], 3), tensors)
    out_r, grads_r = _fwd_and_grads(
        lambda *t: rat_naive(*t[:4], chunk_size=L, prefix_k=t[4], prefix_v=t[5], chunk_start=3),
        tensors,
    )
    assert _rel_err(out_k, out_r) <= F64_TOL
    for name, a, b in zip(["q", "k", "v", "g", "prefix_k", "prefix_v"], grads_k, grads_r):
        assert _rel_err(a, b) <= F64_TOL, f"grad {name}"


def test_auto_backend_on_cpu_equals_torch():
    q, k, v, g, _, _ = _inputs(2, 19, 2, 16)
    a = _kernel(q, k, v, g, 4, 10000.0, backend="auto")
    b = _kernel(q, k, v, g, 4, 10000.0, backend="torch")
    assert _rel_err(a, b) <= F64_TOL


# --------------------------------------------------------------------------- #
# L = 1: RAT is causal softmax attention over (1-g)k, (1-g)v with RoPE by position
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("base", [10000.0, 100.0, None])
@pytest.mark.parametrize("pos0", [0, 5])
def test_L1_is_causal_rope_attention(base, pos0):
    B, T, H, D = 2, 14, 3, 16
    q, k, v, g, _, _ = _inputs(B, T, H, D, seed=7)
    # with L = 1 every chunk is one token: k~_t = (1-g_t) k_t, v~_t = (1-g_t) v_t,
    # and the chunk index is the token position (offset by chunk_start).
    ref = _causal_rope_attention(q, (1 - g) * k, (1 - g) * v, base, pos0=pos0)
    # the loop reference satisfies the identity too (guards the reference itself)
    assert _rel_err(_rat_loops(q, k, v, g, 1, base, chunk_start=pos0), ref) <= F64_TOL
    out = _kernel(q, k, v, g, 1, base, cs=pos0)
    assert _rel_err(out, ref) <= F64_TOL


@pytest.mark.parametrize("base,cs", [(10000.0, 0), (100.0, 5), (None, 2)])
def test_L1_without_lse_runs_fused_attention_equal_to_the_loop_reference(base, cs):
    """The model's forward and prefill at L = 1 (no lse asked): out and summaries, forward and every gradient."""
    B, T, H, D, L = 2, 13, 3, 16, 1
    q, k, v, g, _, _ = _inputs(B, T, H, D, seed=11)

    def kernel(q, k, v, g):
        out, sk, sv = kernels.rat(q, k, v, g, chunk_size=L, rope_base=base, chunk_start=cs, return_summaries=True,
                                  backend="torch")
        return torch.cat([out.flatten(), sk.flatten(), sv.flatten()])

    def loops(q, k, v, g):
        out = _rat_loops(q, k, v, g, L, base, chunk_start=cs)
        return torch.cat([out.flatten(), *(x.flatten() for x in _summaries(k, v, g, L, base, cs))])

    out_k, grads_k = _fwd_and_grads(kernel, [q, k, v, g])
    out_r, grads_r = _fwd_and_grads(loops, [q, k, v, g])
    assert _rel_err(out_k, out_r) <= F64_TOL
    for name, a, b in zip("qkvg", grads_k, grads_r):
        assert _rel_err(a, b) <= F64_TOL, f"grad {name}"


# --------------------------------------------------------------------------- #
# 3. Causality
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("t", [0, 3, 7, 8, 13, 15, 16, 30])
def test_causality(t, with_prefix):
    B, T, H, D, L = 2, 35, 2, 16, 8
    n_prefix = 2 if with_prefix else 0
    cs = n_prefix
    q, k, v, g, pk, pv = _inputs(B, T, H, D, n_prefix, seed=11)
    out = _kernel(q, k, v, g, L, 10000.0, pk, pv, cs)

    gen = torch.Generator().manual_seed(100 + t)
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    fut = slice(t + 1, None)
    shape = q[:, fut].shape
    q2[:, fut] = torch.randn(shape, generator=gen, dtype=q.dtype)
    k2[:, fut] = torch.randn(shape, generator=gen, dtype=q.dtype)
    v2[:, fut] = torch.randn(shape, generator=gen, dtype=q.dtype)
    g2[:, fut] = torch.sigmoid(torch.randn(shape, generator=gen, dtype=q.dtype))
    out2 = _kernel(q2, k2, v2, g2, L, 10000.0, pk, pv, cs)

    assert _rel_err(out2[:, : t + 1], out[:, : t + 1]) <= 1e-12, "past depends on the future"
    # the perturbation is real: later outputs do change
    assert _rel_err(out2[:, t + 1:], out[:, t + 1:]) > 1e-3


# --------------------------------------------------------------------------- #
# 4. Chunk 0 (no prefix) returns the running value state exactly
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("base", [10000.0, None])
@pytest.mark.parametrize("T,L", [(20, 8), (5, 8), (16, 16)])
def test_chunk0_returns_value_state(T, L, base):
    B, H, D = 2, 3, 16
    q, k, v, g, _, _ = _inputs(B, T, H, D, seed=3)
    _, vs = _scan(k, v, g, L)
    n0 = min(T, L)
    out = _kernel(q, k, v, g, L, base)
    # a softmax over one score is exactly 1; allow only float64 rounding of the scan
    assert _rel_err(out[:, :n0], vs[:, :n0]) <= 1e-13
    if T > L:  # and the next chunk really does mix in the summary
        assert _rel_err(out[:, L:2 * L], vs[:, L:2 * L]) > 1e-3


# --------------------------------------------------------------------------- #
# 5. Splitting identity (what RAT sequence parallelism relies on)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("base", [10000.0, None])
@pytest.mark.parametrize("T,T1,L", [(48, 24, 8), (45, 16, 8), (30, 12, 4), (12, 5, 1)])
def test_split_identity(T, T1, L, base):
    assert T1 % L == 0
    B, H, D = 2, 2, 16
    q, k, v, g, _, _ = _inputs(B, T, H, D, seed=5)
    C1 = T1 // L

    full = _kernel(q, k, v, g, L, base)
    pk, pv = _summaries(k[:, :T1], v[:, :T1], g[:, :T1], L, base, chunk_start=0)
    assert pk.shape == (B, C1, H, D)
    second = _kernel(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], L, base, pk, pv, C1)
    assert _rel_err(second, full[:, T1:]) <= F64_TOL
    first = _kernel(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], L, base)
    assert _rel_err(first, full[:, :T1]) <= F64_TOL

    # gradients flow through prefix_k/prefix_v: the composed split run has the same
    # gradients w.r.t. q, k, v, g as the full run.
    def split_run(q, k, v, g):
        pk, pv = _summaries(k[:, :T1], v[:, :T1], g[:, :T1], L, base, chunk_start=0)
        a = _kernel(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], L, base)
        b = _kernel(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], L, base, pk, pv, C1)
        return torch.cat([a, b], 1)

    _, g_full = _fwd_and_grads(lambda q, k, v, g: _kernel(q, k, v, g, L, base), [q, k, v, g])
    _, g_split = _fwd_and_grads(split_run, [q, k, v, g])
    for name, a, b in zip("qkvg", g_split, g_full):
        assert _rel_err(a, b) <= F64_TOL, f"grad {name}"


# --------------------------------------------------------------------------- #
# 6. float32 path (what training uses) vs the float64 reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("B,T,H,D,L,base,n_prefix,cs", [
    pytest.param(2, 37, 3, 32, 8, 10000.0, 0, 0, id="T37-L8"),
    pytest.param(2, 24, 2, 16, 4, 10000.0, 2, 2, id="T24-L4-prefix2"),
    pytest.param(2, 12, 2, 16, 1, None, 0, 0, id="T12-L1-norope"),
])
def test_float32_close_to_float64_reference(B, T, H, D, L, base, n_prefix, cs):
    t64 = _inputs(B, T, H, D, n_prefix, seed=9)
    t32 = [None if t is None else t.float() for t in t64]
    out32, gr32 = _fwd_and_grads(
        lambda q, k, v, g, pk, pv: _kernel(q, k, v, g, L, base, pk, pv, cs), t32)
    out64, gr64 = _fwd_and_grads(
        lambda q, k, v, g, pk, pv: _rat_loops(q, k, v, g, L, base, pk, pv, cs),
        [None if t is None else t.double() for t in t32])
    assert out32.dtype == torch.float32
    assert _rel_err(out32, out64) <= F32_TOL
    for name, a, b in zip(["q", "k", "v", "g", "prefix_k", "prefix_v"], gr32, gr64):
        assert a.dtype == torch.float32
        assert _rel_err(a, b) <= F32_TOL, f"grad {name} rel err {_rel_err(a, b):.3e}"


def test_gate_outside_unit_interval_is_refused_in_debug_mode(monkeypatch):
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    g = torch.sigmoid(torch.randn(1, 8, 2, 16))
    g[0, 3, 1, 5] = 1.5
    kernels.rat(q, k, v, g, chunk_size=4)  # unchecked by default: no device sync on the hot path
    monkeypatch.setenv("LSYS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"forget gate g must lie in \(0, 1\)"):
        kernels.rat(q, k, v, g, chunk_size=4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(chunk_size=0), "chunk_size must be positive"),
        (dict(k=torch.randn(1, 7, 2, 16)), "must share one"),
        (dict(prefix_k=torch.randn(1, 1, 2, 16)), "prefix_k and prefix_v together"),
        (dict(backend="cuda-magic"), "unknown backend"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    args = dict(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16),
                g=torch.sigmoid(torch.randn(1, 8, 2, 16)), chunk_size=4)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kernels.rat(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), **args)


@pytest.mark.parametrize("head_dim", [8, 32])
def test_rope_matrices_rotate_as_apply_rope(head_dim: int):
    # The torch backend turns queries and summaries by a matrix per chunk; it must be rotate-half RoPE exactly.
    from kernels.rope import apply_rope, rope_angles, rope_matrices

    positions = torch.tensor([0, 1, 5, 37, 1000])
    x = torch.randn(3, len(positions), 2, head_dim, dtype=torch.float64)  # [B, T, H, D]
    cos, sin = rope_angles(positions, head_dim, 10000.0)
    expected = apply_rope(x, 0.5 * cos, 0.5 * sin)
    turned = (x[..., None, :] @ rope_matrices(positions, head_dim, 10000.0, scale=0.5)[:, None]).squeeze(-2)
    torch.testing.assert_close(turned, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 7, 12, 16, 17, 31, 64])
def test_prefix_scan_matches_a_loop(length, reverse):
    """The chunk scan's Brent-Kung prefix scan, at lengths that are and are not powers of two, both ways."""
    from kernels.rat.chunk import _scan

    gen = torch.Generator().manual_seed(length)
    gates = torch.rand(2, 3, length, 2, 4, generator=gen, dtype=torch.float64)  # [B, C, L, H, D]
    values = torch.randn(2, 2, 3, length, 2, 4, generator=gen, dtype=torch.float64)  # [S, B, C, L, H, D]
    expected = torch.empty_like(values)
    state = torch.zeros_like(values[..., 0, :, :])
    for t in reversed(range(length)) if reverse else range(length):
        state = gates[..., t, :, :] * state + values[..., t, :, :]
        expected[..., t, :, :] = state
    out = _scan(gates.clone(), values.clone(), reverse=reverse)
    assert _rel_err(out, expected) <= F64_TOL
