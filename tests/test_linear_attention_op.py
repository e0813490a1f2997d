"""Lightning attention (`kernels.linear_attention`) against an independent loop reference.

The reference `_reference` is written straight from ARCHITECTURE.md §5
("linear_attention"): per head, S_t = λ S_{t-1} + k_t^T v_t and o_t = q_t S_t,
one token at a time, with S_{-1} the initial state and S_{T-1} the returned state.
Both package paths are checked against it: the blocked form that `backend="torch"`
runs (chunk.py) and the plain recurrence (naive.py).

One error metric throughout, `_rel_err`: max|a - b| / max|b| (b = the reference).
  * float64 vs float64 reference: <= 1e-10 (``F64_TOL``).
  * float32 op vs float64 reference: <= 1e-5 (``F32_TOL``).
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.linear_attention.chunk import BLOCK_SIZE, linear_attention_chunk
from kernels.linear_attention.naive import linear_attention_naive

F64_TOL = 1e-10
F32_TOL = 1e-5
BF16_TOL = 2e-2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The single error metric of this file: max|a - b| / max|b| (b = reference)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- #
# Independent reference, from the equations
# --------------------------------------------------------------------------- #
def _reference(q, k, v, decay, initial_state=None):
    """Token-by-token recurrence in float64; returns (out [B, T, H, Dv], S_{T-1} [B, H, Dk, Dv])."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S = torch.zeros(B, H, Dk, Dv, dtype=torch.float64) if initial_state is None else initial_state
    lam = decay.reshape(1, H, 1, 1)
    outs = []
    for t in range(T):
        S = lam * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])  # S_t includes token t
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, dim=1), S


def _lightning_decay(H: int) -> torch.Tensor:
    """TransNormerLLM's schedule λ_h = exp(-2^(-8(h+1)/H))."""
    return torch.tensor([math.exp(-(2.0 ** (-8.0 * (h + 1) / H))) for h in range(H)], dtype=torch.float64)


def _decay(H: int, kind: str) -> torch.Tensor:
    """`lightning`: the schedule; `mixed`: the schedule with a small λ (0.5) first and λ = 1 last."""
    decay = _lightning_decay(H)
    if kind == "mixed":
        decay[0], decay[-1] = 0.5, 1.0
    return decay


def _inputs(B, T, H, Dk, Dv, *, decay_kind="lightning", with_state=True, seed=0, dtype=torch.float64):
    """Fresh random q, k, v (and S_{-1}) plus a decay: a dict of op keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "q": torch.randn(B, T, H, Dk, generator=gen, dtype=dtype),
        "k": torch.randn(B, T, H, Dk, generator=gen, dtype=dtype),
        "v": torch.randn(B, T, H, Dv, generator=gen, dtype=dtype),
        "decay": _decay(H, decay_kind).to(dtype),
    }
    if with_state:
        inputs["initial_state"] = torch.randn(B, H, Dk, Dv, generator=gen, dtype=dtype)
    return inputs


def _run_with_grads(fn, inputs, with_state_grad, seed=123):
    """Call fn(**leaf copies of inputs) -> (out, state); return out, state and the grads of
    <out, g_out> (+ <state, g_state>) with random g's, keyed like `inputs`."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    out, state = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum()
    if with_state_grad:
        loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, state, dict(zip(leaves, grads))


def _op(return_state, backend="torch"):
    """The public op as fn(**inputs) -> (out, state or None)."""

    def fn(**inputs):
        result = kernels.linear_attention(**inputs, return_state=return_state, backend=backend)
        return result if return_state else (result, None)

    return fn


def _naive(return_state):
    """The package's plain recurrence, shaped like `_op` (it always computes the state)."""

    def fn(**inputs):
        out, state = linear_attention_naive(**inputs)
        return out, state if return_state else None

    return fn


def _assert_close(out, state, grads, ref_out, ref_state, ref_grads, tol, compare_state=True):
    assert _rel_err(out, ref_out) <= tol, f"out rel err {_rel_err(out, ref_out):.3e}"
    if compare_state:
        assert _rel_err(state, ref_state) <= tol, f"state rel err {_rel_err(state, ref_state):.3e}"
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        err = _rel_err(grads[name], ref_grads[name])
        assert err <= tol, f"grad {name} rel err {err:.3e}"


# --------------------------------------------------------------------------- #
# The reference itself
# --------------------------------------------------------------------------- #
def test_reference_is_the_decay_masked_quadratic_form():
    """From a zero state, O = [(Q K^T) ⊙ M] V with M_ij = λ^(i-j), i >= j (lightning attention)."""
    B, T, H, D = 2, 9, 2, 4
    x = _inputs(B, T, H, D, D, decay_kind="mixed", with_state=False, seed=1)
    out, state = _reference(**x)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    mask = torch.where(lag >= 0, x["decay"][:, None, None] ** lag.clamp(min=0), 0.0)  # [H, T, T]
    scores = torch.einsum("bihd,bjhd->bhij", x["q"], x["k"]) * mask
    assert _rel_err(out, torch.einsum("bhij,bjhd->bihd", scores, x["v"])) <= 1e-13
    weights = x["decay"][:, None] ** (T - 1 - torch.arange(T))  # S_{T-1} = Σ_j λ^(T-1-j) k_j^T v_j
    assert _rel_err(state, torch.einsum("ht,bthk,bthv->bhkv", weights, x["k"], x["v"])) <= 1e-13


# --------------------------------------------------------------------------- #
# Forward, state and gradients against the reference (float64)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("decay_kind", ["lightning", "mixed"])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("Dk,Dv,H", [(16, 16, 2), (32, 32, 4), (16, 32, 4)])
@pytest.mark.parametrize("T", [1, 5, 64, 100, 150])
def test_matches_reference(T, Dk, Dv, H, with_state, return_state, decay_kind):
    assert BLOCK_SIZE == 64  # T covers: one partial block, exact blocks, and partial last blocks
    x = _inputs(2, T, H, Dk, Dv, decay_kind=decay_kind, with_state=with_state, seed=T + Dk + Dv + H)
    ref = _run_with_grads(_reference, x, return_state)

    out, state, grads = _run_with_grads(_op(return_state), x, return_state)
    assert out.shape == (2, T, H, Dv) and out.dtype == torch.float64
    if return_state:
        assert state.shape == (2, H, Dk, Dv) and state.dtype == torch.float64
    _assert_close(out, state, grads, *ref, F64_TOL, compare_state=return_state)

    naive = _run_with_grads(_naive(return_state), x, return_state)
    _assert_close(*naive, *ref, F64_TOL, compare_state=return_state)


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_smaller_blocks_match_reference(block_size):
    """Blocks of 1 row (everything inter-block) and odd sizes with a partial last block."""
    x = _inputs(2, 40, 4, 16, 16, decay_kind="mixed", seed=block_size)
    ref = _run_with_grads(_reference, x, True)
    got = _run_with_grads(lambda **i: linear_attention_chunk(**i, block_size=block_size), x, True)
    _assert_close(*got, *ref, F64_TOL)


def test_auto_backend_on_cpu_equals_torch():
    x = _inputs(2, 70, 2, 16, 16, seed=2)
    out_auto, state_auto = kernels.linear_attention(**x, return_state=True)
    out_torch, state_torch = kernels.linear_attention(**x, return_state=True, backend="torch")
    assert torch.equal(out_auto, out_torch) and torch.equal(state_auto, state_torch)


# --------------------------------------------------------------------------- #
# Lower precision against the float64 reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("decay_kind", ["lightning", "mixed"])
def test_float32_close_to_float64_reference(decay_kind):
    x32 = _inputs(2, 300, 4, 32, 32, decay_kind=decay_kind, seed=9, dtype=torch.float32)
    x64 = {name: t.double() for name, t in x32.items()}
    out, state, grads = _run_with_grads(_op(True), x32, True)
    assert out.dtype == state.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    _assert_close(out, state, grads, *_run_with_grads(_reference, x64, True), F32_TOL)


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 in: out in bf16, state in float32, values near the float64 reference."""
    x = _inputs(2, 100, 2, 16, 16, decay_kind="mixed", seed=4, dtype=torch.bfloat16)
    x["initial_state"] = x["initial_state"].float()
    out, state = kernels.linear_attention(**x, return_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref_out, ref_state = _reference(**{name: t.double() for name, t in x.items()})
    assert _rel_err(out, ref_out) <= BF16_TOL
    assert _rel_err(state, ref_state) <= BF16_TOL


# --------------------------------------------------------------------------- #
# Splitting identity (what LASP relies on): chaining states over pieces = one run
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("pieces", [(64, 64), (50, 78), (37, 64, 29)])
def test_split_identity(pieces):
    T = sum(pieces)
    x = _inputs(2, T, 4, 16, 16, decay_kind="mixed", seed=len(pieces) + pieces[0])

    def chained(q, k, v, decay, initial_state):
        outs, state, start = [], initial_state, 0
        for length in pieces:
            piece = slice(start, start + length)
            out, state = kernels.linear_attention(
                q[:, piece], k[:, piece], v[:, piece], decay=decay, initial_state=state, return_state=True
            )
            outs.append(out)
            start += length
        return torch.cat(outs, dim=1), state

    full = _run_with_grads(_op(True), x, True)
    split = _run_with_grads(chained, x, True)
    _assert_close(*split, *full, F64_TOL)
    # the split run is not trivially the full one: a piece alone, from a zero state, differs
    alone = kernels.linear_attention(x["q"][:, -pieces[-1]:], x["k"][:, -pieces[-1]:], x["v"][:, -pieces[-1]:],
                                     decay=x["decay"])
    assert _rel_err(alone, full[0][:, -pieces[-1]:]) > 1e-3


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _shape_inputs():
    return _inputs(2, 8, 2, 4, 6, seed=3)


@pytest.mark.parametrize("change,message", [
    pytest.param({"k": torch.randn(3, 8, 2, 4)}, r"disagree on B: \{'q': 2, 'k': 3, 'v': 2\}", id="B"),
    pytest.param({"v": torch.randn(2, 7, 2, 6)}, r"disagree on T: \{'q': 8, 'k': 8, 'v': 7\}", id="T"),
    pytest.param({"v": torch.randn(2, 8, 3, 6)}, r"disagree on H: \{'q': 2, 'k': 2, 'v': 3\}", id="H"),
    pytest.param({"k": torch.randn(2, 8, 2, 5)}, r"share Dk, got 4 and 5", id="Dk"),
    pytest.param({"q": torch.randn(2, 8, 8)}, r"must be \[B, T, H, D\], got shapes \(2, 8, 8\)", id="3d"),
    pytest.param({"q": torch.randn(2, 0, 2, 4), "k": torch.randn(2, 0, 2, 4), "v": torch.randn(2, 0, 2, 6)},
                 r"T = 0", id="empty"),
    pytest.param({"decay": torch.tensor([0.75, 0.75, 0.75])}, r"shape \[H\] = \[2\], got \(3,\)", id="decay-len"),
    pytest.param({"decay": torch.tensor(0.75)}, r"shape \[H\] = \[2\], got \(\)", id="decay-0d"),
    pytest.param({"decay": 0.75}, r"shape \[H\] = \[2\], got 0.75", id="decay-float"),
    pytest.param({"initial_state": torch.randn(2, 2, 6, 4)},
                 r"\[B, H, Dk, Dv\] = \[2, 2, 4, 6\], got \[2, 2, 6, 4\]", id="state-transposed"),
    pytest.param({"initial_state": torch.randn(2, 4, 6)},
                 r"\[B, H, Dk, Dv\] = \[2, 2, 4, 6\], got \[2, 4, 6\]", id="state-3d"),
])
def test_bad_input_raises(change, message):
    x = {**_shape_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        kernels.linear_attention(**x)


@pytest.mark.parametrize("decay,message", [
    pytest.param([0.75, 0.0], r"\(0, 1\], got \[0.75, 0.0\]", id="zero"),
    pytest.param([1.5, 0.75], r"\(0, 1\], got \[1.5, 0.75\]", id="above-one"),
    pytest.param([-0.5, 0.75], r"\(0, 1\], got \[-0.5, 0.75\]", id="negative"),
    pytest.param([float("nan"), 0.75], r"\(0, 1\], got \[nan, 0.75\]", id="nan"),
])
def test_decay_outside_its_range_is_refused_in_debug_mode(decay, message, monkeypatch):
    """The range check reads the decay's values (a device sync): only with LSYS_DEBUG=1, as rat's gate check."""
    x = {**_shape_inputs(), "decay": torch.tensor(decay)}
    kernels.linear_attention(**x)  # unchecked by default
    monkeypatch.setenv("LSYS_DEBUG", "1")
    with pytest.raises(ValueError, match=message):
        kernels.linear_attention(**x)


@pytest.mark.parametrize("backend", ["cuda", "naive", ""])
def test_unknown_backend_raises(backend):
    with pytest.raises(ValueError, match=rf"unknown backend {backend!r}; choose one of \('auto', 'torch', 'triton'\)"):
        kernels.linear_attention(**_shape_inputs(), backend=backend)
