"""`kernels.attention` (torch backend) and `kernels.S2Pattern` against an independent loop reference.

The reference is written straight from ARCHITECTURE.md §5: a visibility mask built by
explicit Python loops over (head, query row, key column) at global positions (causal,
sliding window, and the S2 block rule written out again here, not through S2Pattern),
then a float64 softmax over the visible keys, its natural-log normaliser lse, and zero
output / -inf lse for rows that see no key.

Tolerances, one metric throughout (``_rel_err``): max|a - b| / max|b|, b the reference.
  * float64 op vs float64 reference: <= 1e-10 (``F64_TOL``).
  * float32 op vs float64 reference: <= 1e-5 (``F32_TOL``).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import naive

F64_TOL = 1e-10
F32_TOL = 1e-5
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: OpenMP hand-offs cost more than they save, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|; b is the reference and must not be all zero (callers check that case exactly)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """Relative check; -inf entries (lse of empty rows) must match exactly and all-zero references exactly."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    assert torch.isfinite(a).logical_or(a == float("-inf")).all(), f"{what}: NaN or +inf"
    empty = b == float("-inf")
    assert torch.equal(a == float("-inf"), empty), f"{what}: -inf pattern differs"
    a, b = a[~empty], b[~empty]
    if b.numel() == 0 or b.abs().max() == 0:
        assert (a == 0).all(), f"{what}: reference is exactly zero, got max {a.abs().max().item()}"
        return
    err = _rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# --------------------------------------------------------------------------- #
# Independent reference, from the definitions
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _reference_mask(heads, q_len, k_len, causal, window, s2, q_start, k_start) -> torch.Tensor:
    """Bool [heads, Tq, Tk] by loops. s2 is None or (block, local_blocks, vert_stride, num_heads, head_start)."""
    mask = torch.zeros(heads, q_len, k_len, dtype=torch.bool)
    for h in range(heads):
        for r in range(q_len):
            for c in range(k_len):
                i, j = q_start + r, k_start + c
                seen = True
                if causal and j > i:
                    seen = False
                if window is not None and i - j >= window:
                    seen = False
                if s2 is not None:
                    block, local_blocks, vert_stride, num_heads, head_start = s2
                    head = head_start + h  # global head index
                    bi, bj = i // block, j // block
                    step = max(1, vert_stride // num_heads)
                    if not (bj <= bi and (bi - bj < local_blocks or (bj + head * step) % vert_stride == 0)):
                        seen = False
                mask[h, r, c] = seen
    return mask


def _reference(q, k, v, *, causal, window, s2, q_start, k_start, scale):
    """float64 (out [B, Tq, H, D], lse [B, H, Tq]) with out 0 and lse -inf where a row sees nothing."""
    heads, q_len, k_len = q.shape[2], q.shape[1], k.shape[1]
    mask = _reference_mask(heads, q_len, k_len, causal, window, s2, q_start, k_start)
    seen_any = mask.any(-1)  # [H, Tq]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    # Empty rows get dummy zero scores so that their (discarded) lse and its gradient stay finite.
    lse = torch.logsumexp(torch.where(mask, scores, float("-inf")).where(seen_any[..., None], 0.0), dim=-1)
    probs = torch.where(mask, torch.exp(scores - lse[..., None]), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, torch.where(seen_any, lse, float("-inf"))


def _inputs(heads, q_len, k_len, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, n, heads, dim, generator=gen, dtype=torch.float64) for n in (q_len, k_len, k_len))
    grad_out = torch.randn(BATCH, q_len, heads, dim, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(BATCH, heads, q_len, generator=gen, dtype=torch.float64)
    return q, k, v, grad_out, grad_lse


def _pattern(s2):
    """A kernels.S2Pattern from the test's tuple (coverage warnings are not under test here)."""
    if s2 is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.S2Pattern(*s2)


def _forward_and_grads(fn, q, k, v, grad_out, grad_lse, return_lse, dtype=torch.float64):
    """fn(q, k, v) -> (out, lse or None) on `dtype` leaves; returns out, lse and d(q, k, v)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if return_lse:
        # Rows with lse = -inf get a random upstream gradient too: it must not leak into q, k, v.
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads)
    return out, lse, (dq, dk, dv)


# (heads, Tq, Tk, D, causal, window, s2, q_start, k_start, scale, return_lse)
CASES = {
    "sdpa_causal": (2, 37, 37, 16, True, None, None, 0, 0, None, False),
    "sdpa_full_tq_ne_tk": (3, 23, 41, 32, False, None, None, 0, 0, None, False),
    "sdpa_full_offsets_scale": (2, 20, 30, 16, False, None, None, 50, 7, 0.3, False),
    "causal_lse_scale": (2, 37, 37, 16, True, None, None, 0, 0, 0.3, True),
    "full_lse": (3, 23, 41, 16, False, None, None, 0, 0, None, True),
    "window5": (2, 40, 40, 16, True, 5, None, 0, 0, None, True),
    "window1": (3, 30, 30, 32, True, 1, None, 0, 0, None, False),
    "window5_noncausal_offsets": (2, 30, 45, 16, False, 5, None, 20, 10, None, True),
    "window5_d64": (2, 33, 33, 64, True, 5, None, 0, 0, None, True),
    "queries_after_keys": (2, 30, 40, 16, True, None, None, 40, 0, None, True),
    "queries_after_keys_no_lse": (2, 30, 40, 16, True, None, None, 40, 0, None, False),
    "queries_overlap_keys": (3, 25, 30, 32, True, None, None, 20, 10, None, True),
    "queries_before_keys_partly": (2, 25, 30, 16, True, None, None, 5, 15, None, True),
    "keys_all_in_future": (2, 20, 25, 16, True, None, None, 0, 50, None, True),
    "window_all_in_past": (2, 20, 25, 16, True, 5, None, 60, 0, None, True),
    "s2_l1_v2_h2": (2, 50, 50, 16, True, None, (16, 1, 2, 2, 0), 0, 0, None, True),
    "s2_l2_v3_h4_start1": (3, 70, 70, 32, True, None, (16, 2, 3, 4, 1), 0, 0, None, True),
    "s2_l1_v4_h8_start4": (3, 67, 67, 16, True, None, (16, 1, 4, 8, 4), 0, 0, None, False),
    "s2_l1_v5_h2_uncovered": (2, 70, 70, 16, True, None, (16, 1, 5, 2, 0), 0, 0, None, True),
    "s2_offsets": (2, 30, 60, 16, True, None, (16, 1, 3, 3, 0), 48, 0, None, True),
    "s2_window": (2, 60, 60, 16, True, 20, (16, 1, 2, 2, 0), 0, 0, None, True),
}
FLOAT32_CASES = [
    "sdpa_causal", "sdpa_full_tq_ne_tk", "causal_lse_scale", "window5", "queries_after_keys", "s2_l2_v3_h4_start1",
]
SDPA_CASES = {"sdpa_causal", "sdpa_full_tq_ne_tk", "sdpa_full_offsets_scale"}
# Short windowed and S2 attention without lse: SDPA with the pattern as a mask.
MASKED_SDPA_CASES = {"window1", "s2_l1_v4_h8_start4"}


def _run_case(name, dtype, monkeypatch, query_chunk=None):
    heads, q_len, k_len, dim, causal, window, s2, q_start, k_start, scale, return_lse = CASES[name]
    if query_chunk is not None:
        monkeypatch.setattr(naive, "QUERY_CHUNK", query_chunk)
    q, k, v, grad_out, grad_lse = _inputs(heads, q_len, k_len, dim, seed=len(name))
    options = dict(causal=causal, window=window, q_start=q_start, k_start=k_start)
    ref_scale = dim**-0.5 if scale is None else scale

    def op(q, k, v):
        result = kernels.attention(
            q, k, v, s2=_pattern(s2), scale=scale, return_lse=return_lse,
            backend="torch", **options,
        )
        return result if return_lse else (result, None)

    def ref(q, k, v):
        return _reference(q, k, v, s2=s2, scale=ref_scale, **options)

    got = _forward_and_grads(op, q, k, v, grad_out, grad_lse, return_lse, dtype)
    want = _forward_and_grads(ref, q, k, v, grad_out, grad_lse, return_lse)
    return got, want, return_lse


# A query chunk of 7 rows splits every case into several chunks with a partial last one;
# the SDPA cases never reach the chunked code, so they run once.
CHUNKED_RUNS = [(name, None) for name in CASES] + [(name, 7) for name in CASES if name not in SDPA_CASES]


@pytest.mark.parametrize("name, query_chunk", CHUNKED_RUNS)
def test_matches_reference_float64(name, query_chunk, monkeypatch):
    got, want, return_lse = _run_case(name, torch.float64, monkeypatch, query_chunk)
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, want
    assert out.dtype == torch.float64
    _assert_close(out, ref_out, F64_TOL, "out")
    if return_lse:
        assert lse.shape == ref_lse.shape
        _assert_close(lse, ref_lse, F64_TOL, "lse")
    for label, grad, ref_grad in zip("qkv", grads, ref_grads):
        _assert_close(grad, ref_grad, F64_TOL, f"d{label}")


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_matches_float64_reference(name, monkeypatch):
    (out, lse, grads), (ref_out, ref_lse, ref_grads), return_lse = _run_case(name, torch.float32, monkeypatch, 16)
    assert out.dtype == torch.float32
    _assert_close(out, ref_out, F32_TOL, "out")
    if return_lse:
        assert lse.dtype == torch.float32
        _assert_close(lse, ref_lse, F32_TOL, "lse")
    for label, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.dtype == torch.float32
        _assert_close(grad, ref_grad, F32_TOL, f"d{label}")


def test_bfloat16_lse_is_float32_and_close():
    q, k, v, _, _ = _inputs(2, 40, 40, 16)
    out, lse = kernels.attention(*(t.to(torch.bfloat16) for t in (q, k, v)), window=7, return_lse=True)
    ref_out, ref_lse = _reference(
        *(t.to(torch.bfloat16).to(torch.float64) for t in (q, k, v)),
        causal=True, window=7, s2=None, q_start=0, k_start=0, scale=16**-0.5,
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert _rel_err(lse, ref_lse) <= 1e-6  # computed in fp32: only the fp32 rounding, not bf16's
    assert _rel_err(out, ref_out) <= 1e-2  # the output is rounded to bf16 once


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_fast_path_taken_exactly_when_it_applies(name, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    heads, q_len, k_len, dim, causal, window, s2, q_start, k_start, scale, return_lse = CASES[name]
    q, k, v, _, _ = _inputs(heads, q_len, k_len, dim)
    kernels.attention(
        q, k, v, causal=causal, window=window, s2=_pattern(s2), q_start=q_start, k_start=k_start,
        scale=scale, return_lse=return_lse,
    )
    assert bool(calls) == (name in SDPA_CASES | MASKED_SDPA_CASES)


@pytest.mark.parametrize("name", sorted(MASKED_SDPA_CASES))
def test_long_windowed_and_s2_attention_runs_chunked(name, monkeypatch):
    """Past MASKED_SDPA_MAX_SCORES the mask is not built: the chunked reference runs, with the same result."""
    attention_module = importlib.import_module("kernels.attention")  # the package; kernels.attention is the op
    monkeypatch.setattr(attention_module, "MASKED_SDPA_MAX_SCORES", 100)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real_sdpa(*a, **kw))
    (out, _, grads), (ref_out, _, ref_grads), _ = _run_case(name, torch.float64, monkeypatch)
    assert not calls
    _assert_close(out, ref_out, F64_TOL, "out")
    for label, grad, ref_grad in zip("qkv", grads, ref_grads):
        _assert_close(grad, ref_grad, F64_TOL, f"d{label}")


# --------------------------------------------------------------------------- #
# Ring attention's splitting identity
# --------------------------------------------------------------------------- #
def _merge(out_a, lse_a, out_b, lse_b):
    """Stable merge of two partial attentions over disjoint key sets; an empty side (lse -inf) drops out."""
    empty_a, empty_b = torch.isinf(lse_a), torch.isinf(lse_b)
    either_empty = empty_a | empty_b
    # Feed only finite numbers to sigmoid/logsigmoid so that no NaN reaches backward.
    safe_a = torch.where(either_empty, 0.0, lse_a)
    safe_b = torch.where(either_empty, 0.0, lse_b)
    weight_b = torch.where(empty_a, 1.0, torch.where(empty_b, 0.0, torch.sigmoid(safe_b - safe_a)))
    out = out_a - weight_b.transpose(1, 2)[..., None] * (out_a - out_b)
    lse = torch.where(
        empty_a, lse_b, torch.where(empty_b, lse_a, safe_a - F.logsigmoid(safe_a - safe_b))
    )
    return out, lse


SPLIT_CASES = {
    # (heads, q_start, Tq, key shard boundaries, causal, window, s2)
    "causal_zigzag_three_shards": (2, 30, 20, (0, 20, 45, 60), True, None, None),
    "causal_future_shard": (2, 0, 24, (0, 24, 48), True, None, None),
    "window_some_shards_empty": (3, 30, 20, (0, 20, 35, 50), True, 8, None),
    "full_two_shards": (2, 0, 20, (0, 13, 31), False, None, None),
    "s2_three_shards": (2, 40, 30, (0, 25, 50, 70), True, None, (16, 1, 2, 2, 0)),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_key_shards_merge_to_full_attention(name):
    heads, q_start, q_len, bounds, causal, window, s2 = SPLIT_CASES[name]
    q, k, v, grad_out, grad_lse = _inputs(heads, q_len, bounds[-1], 16, seed=3)
    options = dict(causal=causal, window=window, s2=_pattern(s2), q_start=q_start, return_lse=True)

    def sharded(q, k, v):
        out, lse = None, None
        for begin, end in zip(bounds[:-1], bounds[1:]):
            part = kernels.attention(q, k[:, begin:end], v[:, begin:end], k_start=begin, **options)
            out, lse = part if out is None else _merge(out, lse, *part)
        return out, lse

    def whole(q, k, v):
        return kernels.attention(q, k, v, k_start=0, **options)

    out, lse, grads = _forward_and_grads(sharded, q, k, v, grad_out, grad_lse, True)
    ref_out, ref_lse, ref_grads = _forward_and_grads(whole, q, k, v, grad_out, grad_lse, True)
    _assert_close(out, ref_out, F64_TOL, "out")
    _assert_close(lse, ref_lse, F64_TOL, "lse")
    for label, grad, ref_grad in zip("qkv", grads, ref_grads):
        _assert_close(grad, ref_grad, F64_TOL, f"d{label}")


# --------------------------------------------------------------------------- #
# Rows that see no key
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_without_keys_are_zero_with_zero_gradients(dtype):
    # Keys start at position 10: query rows 0..9 see nothing, rows 10.. see some keys.
    q, k, v, grad_out, grad_lse = (t.to(dtype) for t in _inputs(2, 20, 15, 16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = kernels.attention(q, k, v, k_start=10, return_lse=True)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    assert (out[:, :10] == 0).all() and (out[:, 10:] != 0).any()
    assert (lse[..., :10] == float("-inf")).all() and torch.isfinite(lse[..., 10:]).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[:, :10] == 0).all() and (dq[:, 10:] != 0).any()


def test_keys_all_in_future_give_zero_output_and_gradients():
    q, k, v, grad_out, grad_lse = _inputs(2, 16, 16, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = kernels.attention(q, k, v, q_start=0, k_start=16, return_lse=True)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert all((g == 0).all() for g in (dq, dk, dv))


# --------------------------------------------------------------------------- #
# Memory: bounded score blocks, nothing of size Tq x Tk kept for backward
# --------------------------------------------------------------------------- #
def _record_blocks(monkeypatch):
    """Replace naive.attend_block by a wrapper that records (rows, columns) of every score block."""
    shapes = []
    real_block = naive.attend_block

    def recording(q, k, v, *args, **kwargs):
        shapes.append((q.shape[1], k.shape[1]))
        return real_block(q, k, v, *args, **kwargs)

    monkeypatch.setattr(naive, "attend_block", recording)
    return shapes


@pytest.mark.parametrize(
    "causal, window, q_start, k_start, max_columns",
    [
        (True, 64, 0, 0, naive.QUERY_CHUNK + 63),  # the window bounds every block
        (True, None, 0, 0, 1024),  # causal: the last chunk reads every key
        (True, None, 0, 1024 - naive.QUERY_CHUNK, naive.QUERY_CHUNK),  # keys late: early chunks read none
    ],
)
def test_score_blocks_are_bounded(causal, window, q_start, k_start, max_columns, monkeypatch):
    shapes = _record_blocks(monkeypatch)
    q = torch.randn(1, 1024, 1, 16)
    kv = torch.randn(1, 1024, 1, 16)
    with torch.no_grad():
        kernels.attention(q, kv, kv, causal=causal, window=window, q_start=q_start, k_start=k_start, return_lse=True)
    assert len(shapes) == 1024 // naive.QUERY_CHUNK
    assert max(rows for rows, _ in shapes) == naive.QUERY_CHUNK
    assert max(columns for _, columns in shapes) == max_columns
    if causal and window is None:
        # Chunk n sees keys up to its last row only: the key range grows chunk by chunk.
        begins = [q_start + n * naive.QUERY_CHUNK for n in range(len(shapes))]
        expected = [min(max(b + naive.QUERY_CHUNK - k_start, 0), 1024) for b in begins]
        assert [columns for _, columns in shapes] == expected


def test_backward_keeps_no_score_matrix():
    batch, heads, length, dim = 1, 2, 1024, 16
    q, k, v = (torch.randn(batch, length, heads, dim, requires_grad=True) for _ in range(3))
    saved_elements = []

    def pack(tensor):
        saved_elements.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = kernels.attention(q, k, v, window=300, return_lse=True)[0]
    # Without checkpointing each chunk would save its [B, H, 256, <=555] probabilities;
    # with it only the inputs (O(T * H * D)) remain.
    assert sum(saved_elements) < batch * heads * length * dim * 8
    assert max(saved_elements) < naive.QUERY_CHUNK * 300  # one head's score block of one chunk
    out.sum().backward()  # and backward still works from what was kept
    assert torch.isfinite(q.grad).all() and (q.grad != 0).any()


# --------------------------------------------------------------------------- #
# S2Pattern
# --------------------------------------------------------------------------- #
def _s2_rule(head, bi, bj, local_blocks, vert_stride, num_heads):
    """ARCHITECTURE.md §5, written again: is key block bj visible to query block bi for global head `head`?"""
    step = max(1, vert_stride // num_heads)
    return bj <= bi and (bi - bj < local_blocks or (bj + head * step) % vert_stride == 0)


COVERAGE_COMBOS = [  # (local_blocks, vert_stride, num_heads)
    (1, 1, 1), (1, 4, 4), (1, 4, 8), (2, 3, 5), (1, 8, 16), (3, 6, 6),  # num_heads >= vert_stride
    (1, 8, 2), (2, 6, 4), (1, 5, 3), (1, 3, 2),  # num_heads < vert_stride
]


@pytest.mark.parametrize("local_blocks, vert_stride, num_heads", COVERAGE_COMBOS)
def test_coverage_against_brute_force(local_blocks, vert_stride, num_heads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = kernels.S2Pattern(16, local_blocks, vert_stride, num_heads)
    num_blocks = local_blocks + 2 * vert_stride + 2  # long enough for every residue to appear beyond the window
    covered = all(
        any(_s2_rule(h, bi, bj, local_blocks, vert_stride, num_heads) for h in range(num_heads))
        for bi in range(num_blocks)
        for bj in range(bi + 1)
    )
    assert pattern.covers_all_blocks() == covered
    if num_heads >= vert_stride:
        assert covered
    for h in range(num_heads):
        for bi in range(num_blocks):
            for bj in range(num_blocks):
                assert pattern.block_visible(h, bi, bj) == _s2_rule(h, bi, bj, local_blocks, vert_stride, num_heads)


def test_check_coverage_warns_when_heads_cannot_cover():
    with pytest.warns(UserWarning, match=r"num_heads=2 and vert_stride=8"):
        pattern = kernels.S2Pattern(16, 1, 8, 2)
    # It truly does not cover: at distance >= local_blocks some key blocks are seen by no head.
    assert not any(_s2_rule(h, 20, 1, 1, 8, 2) for h in range(2))
    with pytest.warns(UserWarning, match="vert_stride=8"):
        pattern.check_coverage()


def test_no_warning_when_covered():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.S2Pattern(16, 2, 4, 4)
        kernels.S2Pattern(64, 16, 8, 16, head_start=8)


@pytest.mark.parametrize(
    "args, message",
    [
        ((8, 1, 2, 2), "S2 block size must be at least 16, got 8"),
        ((16, 0, 2, 2), "local_blocks must be at least 1, got 0"),
        ((16, 1, 0, 2), "vert_stride must be at least 1, got 0"),
        ((16, 1, 1, 0), "num_heads must be at least 1, got 0"),
        ((16, 1, 2, 2, 2), "head_start must lie in"),
        ((16, 1, 2, 2, -1), "head_start must lie in"),
    ],
)
def test_s2_pattern_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        kernels.S2Pattern(*args)


@pytest.mark.parametrize("seq_len", [16, 100, 1000])
@pytest.mark.parametrize("local_blocks, vert_stride, num_heads", [(1, 4, 4), (2, 3, 5), (4, 8, 2), (1, 1, 3)])
def test_kept_fraction_against_brute_force(seq_len, local_blocks, vert_stride, num_heads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = kernels.S2Pattern(16, local_blocks, vert_stride, num_heads, head_start=num_heads - 1)
    num_blocks = -(-seq_len // 16)
    pairs = [(bi, bj) for bi in range(num_blocks) for bj in range(bi + 1)]
    visible = sum(
        _s2_rule(h, bi, bj, local_blocks, vert_stride, num_heads) for h in range(num_heads) for bi, bj in pairs
    )
    assert pattern.kept_fraction(seq_len) == pytest.approx(visible / (len(pairs) * num_heads), abs=1e-12)


def test_token_mask_matches_rule():
    pattern = kernels.S2Pattern(16, 1, 3, 4, head_start=1)
    q_positions, k_positions = torch.arange(30, 90), torch.arange(0, 80)
    mask = pattern.token_mask(q_positions, k_positions, heads=3)
    assert mask.shape == (3, 60, 80)
    for h in range(3):
        for r, i in enumerate(q_positions.tolist()):
            for c, j in enumerate(k_positions.tolist()):
                expected = j <= i and _s2_rule(1 + h, i // 16, j // 16, 1, 3, 4)
                assert mask[h, r, c].item() == expected


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _qkv(q_shape=(2, 8, 2, 16), k_shape=(2, 8, 2, 16), v_shape=(2, 8, 2, 16)):
    return torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)


BAD_INPUTS = {
    "q_not_4d": (lambda: _qkv(q_shape=(2, 8, 32)), {}, r"4-D"),
    "v_not_4d": (lambda: _qkv(v_shape=(8, 2, 16)), {}, r"4-D"),
    "batch_differs": (lambda: _qkv(k_shape=(3, 8, 2, 16), v_shape=(3, 8, 2, 16)), {}, r"k \(3, 8, 2, 16\)"),
    "heads_differ": (lambda: _qkv(k_shape=(2, 8, 4, 16), v_shape=(2, 8, 4, 16)), {}, r"k \(2, 8, 4, 16\)"),
    "dim_differs": (lambda: _qkv(v_shape=(2, 8, 2, 32)), {}, r"v \(2, 8, 2, 32\)"),
    "tk_differs": (lambda: _qkv(k_shape=(2, 9, 2, 16)), {}, r"k \(2, 9, 2, 16\)"),
    "window_zero": (_qkv, {"window": 0}, "window must be a positive number of keys .* got 0"),
    "window_negative": (_qkv, {"window": -3}, "got -3"),
    "s2_wrong_type": (_qkv, {"s2": (16, 1, 2, 2)}, "s2 must be a kernels.S2Pattern or None, got tuple"),
    "negative_q_start": (_qkv, {"q_start": -1}, "got -1 and 0"),
    "negative_k_start": (_qkv, {"k_start": -5}, "got 0 and -5"),
    "unknown_backend": (_qkv, {"backend": "cuda"}, r"unknown backend 'cuda'; choose one of \('auto', 'torch', 'triton'\)"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises(name):
    make, options, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        kernels.attention(*make(), **options)


def test_s2_with_causal_false_raises():
    with pytest.raises(ValueError, match="S2 pattern is causal"):
        kernels.attention(*_qkv(), causal=False, s2=kernels.S2Pattern(16, 1, 2, 2))


def test_s2_heads_beyond_pattern_raise():
    with pytest.raises(ValueError, match="exceed the S2 pattern's num_heads=2"):
        kernels.attention(*_qkv(), s2=kernels.S2Pattern(16, 1, 2, 2, head_start=1))
