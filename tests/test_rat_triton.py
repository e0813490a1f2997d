"""The Triton backend of `kernels.rat` against the float64 torch reference, forward and every gradient.

On CPU the kernels run in the Triton interpreter (fp32, fp16); with a GPU the same tests run
compiled, bf16 included. Outputs are NaN-poisoned before each kernel (`poison_kernel_outputs`),
so an element a kernel forgets to write fails. Shapes are small: T of 5..150 is no multiple of
the 64-token tiles nor of the 16-summary tiles the interpreter runs, and the longer cases go
through several of each, masked and unmasked. Every chunk size (8, 16, 32, 64) and head dim
(32, 64, 128) is covered, with and without RoPE, with prefix summaries and chunk_start > 0.
Packed documents (segment_ids) are checked against the torch `rat_documents` and against each
document run alone, and a piece with document_offset and initial_state against `rat_documents`.

Tolerances: the shared per-dtype (atol, rtol) of tests/triton_testing.py, with atol multiplied
by the largest magnitude of the compared tensor (when above 1): RAT gradients reach ~10 (dg sums
both streams), and the kernels round rotated queries, summaries, probabilities and score
gradients to fp16/bf16 before each tensor-core dot, so the error of an element scales with the
tensor it is summed into, not with the element. Observed in the interpreter: fp32 errors at
~1e-3 of this tolerance (exact-fp32 dots), fp16 at up to ~0.3 of it.
"""

import contextlib

import pytest
import torch

from kernels.rat import chunk_summaries, rat
from kernels.rat import triton as rat_triton_module
from kernels.rat import naive
from kernels.rat.naive import rat_naive
from tests.triton_testing import DEVICE, DTYPES, TOLERANCES, gpu, needs_gpu, poison_kernel_outputs  # noqa: F401

def _inputs(batch, seq_len, heads, head_dim, num_prefix, dtype, *, seed, gate_dtype=None, packed=False):
    """Random q, k, v (and prefix summaries) in `dtype`, gates sigmoid(randn) clamped to [0.05, 0.95].

    `packed` takes q, k, v as slices of one wide projection, as the model does: strided, last dim contiguous.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    g = torch.sigmoid(torch.randn(shape, generator=gen)).clamp(0.05, 0.95).to(gate_dtype or dtype)
    if packed:
        wide = torch.randn(batch, seq_len, heads, 3 * head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
        q, k, v = wide.split(head_dim, dim=-1)
    else:
        q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    tensors = {"q": q, "k": k, "v": v, "g": g}
    if num_prefix is not None:
        prefix_shape = (batch, num_prefix, heads, head_dim)
        tensors["prefix_k"] = torch.randn(prefix_shape, generator=gen).to(dtype)
        tensors["prefix_v"] = torch.randn(prefix_shape, generator=gen).to(dtype)
    return {name: t.to(DEVICE) for name, t in tensors.items()}, gen


def _strided_leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of `t` with the same strides (clone() would make a sliced view contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t).requires_grad_(True)


def _forward_and_grads(fn, inputs: dict, grad_out: torch.Tensor):
    leaves = {name: _strided_leaf(t) for name, t in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=grad_out.to(out.dtype))
    return out, dict(zip(leaves, grads))


def _check_against_reference(inputs, gen, dtype, **options):
    """Triton on `inputs` vs rat_naive in float64 on the same values, output and every gradient."""
    out = inputs["v"]
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    got, got_grads = _forward_and_grads(lambda **t: rat(**t, **options, backend="triton"), inputs, grad_out)
    want, want_grads = _forward_and_grads(
        lambda **t: rat_naive(**t, **options), {name: t.double() for name, t in inputs.items()}, grad_out.double()
    )
    assert got.dtype == inputs["v"].dtype
    _assert_close_to_magnitude("out", got, want, dtype)
    for name in got_grads:
        assert got_grads[name].dtype == inputs[name].dtype, name
        _assert_close_to_magnitude(f"d{name}", got_grads[name], want_grads[name], dtype)


def _assert_close_to_magnitude(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The shared tolerance with atol relative to the tensor's largest magnitude (see the module docstring)."""
    atol, rtol = TOLERANCES[dtype]
    magnitude = max(1.0, want.abs().amax().item()) if want.numel() else 1.0
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    torch.testing.assert_close(
        got.double(), want, atol=atol * magnitude, rtol=rtol, msg=lambda m: f"{name} ({dtype}): {m}"
    )


# (batch, seq_len, head_dim, chunk_size, rope_base, num_prefix, chunk_start)
CASES = [
    pytest.param(2, 45, 64, 8, 10000.0, None, 0, id="L8-T45-partial"),
    pytest.param(1, 150, 64, 8, 10000.0, 3, 1000, id="L8-T150-prefix3-start1000-multitile"),
    pytest.param(1, 77, 32, 16, 10000.0, 2, 2, id="L16-T77-D32-prefix2"),
    pytest.param(1, 100, 128, 32, None, None, 0, id="L32-T100-D128-norope"),
    pytest.param(1, 140, 64, 64, 10000.0, 4, 4, id="L64-T140-prefix4-partial"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seq_len, head_dim, chunk_size, rope_base, num_prefix, chunk_start", CASES)
def test_triton_matches_float64_reference(batch, seq_len, head_dim, chunk_size, rope_base, num_prefix, chunk_start,
                                          dtype):
    inputs, gen = _inputs(batch, seq_len, 2, head_dim, num_prefix, dtype, seed=seq_len * 7 + chunk_size)
    _check_against_reference(
        inputs, gen, dtype, chunk_size=chunk_size, rope_base=rope_base, chunk_start=chunk_start
    )


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=[gpu, needs_gpu])])
def test_fp32_gate_with_half_inputs_strided(dtype):
    """The model's mix: q, k, v in fp16/bf16 sliced out of one projection, the gate in fp32."""
    inputs, gen = _inputs(2, 53, 2, 64, 2, dtype, seed=3, gate_dtype=torch.float32, packed=True)
    assert inputs["q"].stride(-1) == 1 and not inputs["q"].is_contiguous()
    _check_against_reference(inputs, gen, dtype, chunk_size=16, rope_base=10000.0, chunk_start=2)


@pytest.mark.parametrize("seq_len, num_prefix", [(5, None), (24, 0)], ids=["T5-one-partial-chunk", "empty-prefix"])
def test_short_sequences_and_empty_prefix(seq_len, num_prefix):
    """A lone partial chunk (no summary is ever seen), and RAT-SP's first piece: a prefix of zero summaries."""
    inputs, gen = _inputs(1, seq_len, 2, 32, num_prefix, torch.float32, seed=11)
    _check_against_reference(inputs, gen, torch.float32, chunk_size=8, rope_base=10000.0, chunk_start=0)


def test_native_associative_scan_path(monkeypatch):
    """The compiled kernels scan with tl.associative_scan; run that path once in the interpreter too."""
    monkeypatch.setattr(rat_triton_module, "_NATIVE_SCAN", rat_triton_module.tl.constexpr(True))
    inputs, gen = _inputs(1, 21, 1, 32, 1, torch.float32, seed=5)
    _check_against_reference(inputs, gen, torch.float32, chunk_size=8, rope_base=10000.0, chunk_start=1)


# (seq_len, head_dim, chunk_size, rope_base, chunk_start)
SUMMARY_CASES = [
    pytest.param(45, 64, 8, 10000.0, 3, id="L8-T45-partial-start3"),
    pytest.param(70, 32, 32, None, 0, id="L32-T70-D32-norope"),
    pytest.param(130, 128, 64, 10000.0, 500, id="L64-T130-D128-start500"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len, head_dim, chunk_size, rope_base, chunk_start", SUMMARY_CASES)
def test_chunk_summaries_triton_matches_float64_reference(seq_len, head_dim, chunk_size, rope_base, chunk_start,
                                                          dtype):
    """RAT-SP's prefix: the rotated final states of the complete chunks, and their gradients into k, v, g."""
    inputs, gen = _inputs(2, seq_len, 2, head_dim, None, dtype, seed=seq_len, gate_dtype=torch.float32)
    del inputs["q"]
    options = dict(chunk_size=chunk_size, rope_base=rope_base, chunk_start=chunk_start)
    num_full = seq_len // chunk_size
    grad_k, grad_v = (torch.randn(2, num_full, 2, head_dim, generator=gen).to(DEVICE) for _ in range(2))

    def run(fn, tensors):
        leaves = {name: _strided_leaf(t) for name, t in tensors.items()}
        sum_k, sum_v = fn(**leaves, **options)
        upstream = (grad_k.to(sum_k.dtype), grad_v.to(sum_v.dtype))
        grads = torch.autograd.grad((sum_k, sum_v), list(leaves.values()), upstream)
        return (sum_k, sum_v), dict(zip(leaves, grads))

    (got_k, got_v), got_grads = run(lambda **t: chunk_summaries(**t, backend="triton"), inputs)
    (want_k, want_v), want_grads = run(naive.chunk_summaries, {name: t.double() for name, t in inputs.items()})
    assert got_k.dtype == got_v.dtype == torch.float32  # promote(k, g): the gate is fp32
    _assert_close_to_magnitude("summary_k", got_k, want_k, dtype)
    _assert_close_to_magnitude("summary_v", got_v, want_v, dtype)
    for name in got_grads:
        assert got_grads[name].dtype == inputs[name].dtype, name
        _assert_close_to_magnitude(f"d{name}", got_grads[name], want_grads[name], dtype)


@pytest.mark.parametrize("seq_len, num_prefix, chunk_start", [(45, None, 0), (150, 3, 7)], ids=["T45", "T150-prefix3"])
def test_lse_and_summaries_outputs_and_their_gradients(seq_len, num_prefix, chunk_start):
    """return_lse and return_summaries (RAT-SP merges with them): values and gradients through every output."""
    inputs, gen = _inputs(1, seq_len, 2, 32, num_prefix, torch.float32, seed=seq_len)
    options = dict(chunk_size=8, rope_base=10000.0, chunk_start=chunk_start)

    def triton_outputs(**t):
        return rat(**t, **options, return_lse=True, return_summaries=True, backend="triton")

    def reference_outputs(**t):
        out, lse = rat_naive(**t, **options, return_lse=True)
        return (out, lse, *naive.chunk_summaries(t["k"], t["v"], t["g"], **options))

    got = triton_outputs(**inputs)
    want = reference_outputs(**{name: t.double() for name, t in inputs.items()})
    names = ("out", "lse", "summary_k", "summary_v")
    upstream = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(DEVICE) for w in want]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        _assert_close_to_magnitude(name, a, b, torch.float32)

    def grads(fn, tensors, used):
        leaves = {name: _strided_leaf(t) for name, t in tensors.items()}
        outputs = fn(**leaves)
        total = sum((o * u.to(o.dtype)).sum() for name, o, u in zip(names, outputs, upstream) if name in used)
        return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))

    for used in (names, ("lse",)):  # every output, then lse alone (no gradient reaches out or the summaries)
        got_grads = grads(triton_outputs, inputs, used)
        want_grads = grads(reference_outputs, {name: t.double() for name, t in inputs.items()}, used)
        for name, got_grad in got_grads.items():
            want_grad = want_grads[name]
            if want_grad is None:  # lse does not read v: the reference leaves it out of the graph
                want_grad = torch.zeros_like(inputs[name], dtype=torch.float64)
            _assert_close_to_magnitude(f"d{name} ({', '.join(used)})", got_grad, want_grad, torch.float32)


# --------------------------------------------------------------------------------------------- #
# Packed documents (segment_ids): the kernels on the documents realigned to the chunk grid
# --------------------------------------------------------------------------------------------- #
def _random_lengths(total: int, chunk_size: int, seed: int) -> list[int]:
    """Document lengths summing to `total`: first 1 and L - 1 (shorter than a chunk), then random in 1..5L,
    so that documents cross chunk boundaries and the realigned 64-token query tiles and 16-summary tiles."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, chunk_size - 1]
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, 5 * chunk_size + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def _segment_ids(rows: list[list[int]]) -> torch.Tensor:
    """`[B, T]` ids from each row's document lengths."""
    return torch.stack([torch.cat([torch.full((n,), doc) for doc, n in enumerate(row)]) for row in rows]).to(DEVICE)


def _each_document_alone(q, k, v, g, *, segment_ids, chunk_size, rope_base):
    """The definition: rat_naive and naive.chunk_summaries on every document by itself, put back in place;
    each row's summaries in the slots of `chunk_end_slots` (its complete chunks in order, then zeros)."""
    out, lse = rat_naive(q, k, v, g, chunk_size=chunk_size, rope_base=rope_base, return_lse=True,
                         segment_ids=segment_ids)
    batch, seq_len, heads, head_dim = k.shape
    slots = -(-seq_len // chunk_size)
    summaries = []
    for row in range(batch):
        _, lengths = torch.unique_consecutive(segment_ids[row], return_counts=True)
        documents = zip(*(x[row : row + 1].split(lengths.tolist(), dim=1) for x in (k, v, g)))
        pieces = [naive.chunk_summaries(*document, chunk_size=chunk_size, rope_base=rope_base)
                  for document in documents]
        row_k, row_v = (torch.cat([piece[i] for piece in pieces], dim=1) for i in (0, 1))
        empty = row_k.new_zeros(1, slots - row_k.shape[1], heads, head_dim)
        summaries.append((torch.cat([row_k, empty], dim=1), torch.cat([row_v, empty], dim=1)))
    return out, lse, torch.cat([s[0] for s in summaries]), torch.cat([s[1] for s in summaries])


def _check_outputs_and_grads(triton_fn, references: dict, inputs: dict, gen, dtype) -> None:
    """Triton on `inputs` against each float64 reference: the four outputs, and every input's gradient with
    one random upstream gradient through all four."""
    names = ("out", "lse", "summary_k", "summary_v")

    def run(fn, tensors):
        leaves = {name: _strided_leaf(t) for name, t in tensors.items()}
        return leaves, fn(**leaves)

    def grads(leaves, outputs):
        total = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream))
        found = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        # An input that reaches no output (a carried state no row takes up) has gradient zero.
        return {name: torch.zeros_like(leaves[name]) if grad is None else grad for name, grad in zip(leaves, found)}

    got_leaves, got = run(triton_fn, inputs)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE) for o in got]
    got_grads = grads(got_leaves, got)
    assert got[0].dtype == inputs["v"].dtype
    for reference_name, reference in references.items():
        want_leaves, want = run(reference, {name: t.double() for name, t in inputs.items()})
        want_grads = grads(want_leaves, want)
        for name, a, b in zip(names, got, want):
            _assert_close_to_magnitude(f"{name} vs {reference_name}", a, b, dtype)
        for name, grad in got_grads.items():
            assert grad.dtype == inputs[name].dtype, name
            _assert_close_to_magnitude(f"d{name} vs {reference_name}", grad, want_grads[name], dtype)


# (chunk_size, seq_len, single_row): one row holds documents of random lengths, the other (single_row) one document
DOCUMENT_CASES = [
    # The long document of row 0 makes realigned query tiles whose summary tiles every row sees in full.
    pytest.param(8, 200, 0, id="L8-T200"),
    pytest.param(16, 120, 1, id="L16-T120"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size, seq_len, single_row", DOCUMENT_CASES)
def test_documents_match_torch_and_each_document_alone(chunk_size, seq_len, single_row, dtype):
    """segment_ids on the Triton backend: out, lse, summaries and dq, dk, dv, dg as rat_documents and as the
    definition (each document run alone) give them."""
    rows = [_random_lengths(seq_len, chunk_size, seed=seq_len)]
    rows.insert(single_row, [seq_len])
    segment_ids = _segment_ids(rows)
    inputs, gen = _inputs(2, seq_len, 1, 32, None, dtype, seed=chunk_size)  # one head: the interpreter's time
    options = dict(chunk_size=chunk_size, rope_base=10000.0, segment_ids=segment_ids)

    def with_backend(backend):
        return lambda **t: rat(**t, **options, return_lse=True, return_summaries=True, backend=backend)

    references = {
        "rat_documents": with_backend("torch"),
        "each alone": lambda **t: _each_document_alone(**t, **options),
    }
    _check_outputs_and_grads(with_backend("triton"), references, inputs, gen, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_documents_piece_with_offset_and_initial_state(dtype):
    """A piece of a longer sequence (RAT-SP): each row's first document began document_offset tokens earlier, and
    its first chunk takes up the carried state. Offsets 13 and 7 continue a chunk (7: the first token ends it);
    16 starts one, where nothing is carried. The model's mix: fp32 gate and state with `dtype` q, k, v."""
    chunk_size, seq_len = 8, 40
    rows = [[12, *_random_lengths(seq_len - 12, chunk_size, seed=4)], [seq_len], [3, 20, 17]]
    segment_ids = _segment_ids(rows)
    inputs, gen = _inputs(3, seq_len, 2, 32, None, dtype, seed=9, gate_dtype=torch.float32)
    inputs["initial_k"], inputs["initial_v"] = (torch.randn(3, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    document_offset = torch.tensor([13, 16, 7], device=DEVICE)

    def with_backend(backend):
        def run(q, k, v, g, initial_k, initial_v):
            return rat(q, k, v, g, chunk_size=chunk_size, segment_ids=segment_ids, document_offset=document_offset,
                       initial_state=(initial_k, initial_v), return_lse=True, return_summaries=True, backend=backend)
        return run

    _check_outputs_and_grads(with_backend("triton"), {"rat_documents": with_backend("torch")}, inputs, gen, dtype)


def _no_triton(*args, **kwargs):
    raise AssertionError("the Triton kernels were launched")


def test_auto_runs_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(rat_triton_module, "rat_triton", _no_triton)
    inputs, _ = _inputs(1, 20, 2, 32, None, torch.float32, seed=1)
    cpu_inputs = {name: t.cpu() for name, t in inputs.items()}
    out = rat(**cpu_inputs, chunk_size=8, backend="auto")
    torch.testing.assert_close(out, rat(**cpu_inputs, chunk_size=8, backend="torch"), rtol=0, atol=0)
    monkeypatch.setattr(rat_triton_module, "chunk_summaries_triton", _no_triton)
    kvg = {name: cpu_inputs[name] for name in "kvg"}
    summaries = chunk_summaries(**kvg, chunk_size=8, backend="auto")
    torch.testing.assert_close(summaries, chunk_summaries(**kvg, chunk_size=8, backend="torch"), rtol=0, atol=0)
    monkeypatch.setattr(rat_triton_module, "rat_documents_triton", _no_triton)
    segment_ids = torch.tensor([[0] * 7 + [1] * 13])
    out = rat(**cpu_inputs, chunk_size=8, segment_ids=segment_ids, backend="auto")
    torch.testing.assert_close(out, rat(**cpu_inputs, chunk_size=8, segment_ids=segment_ids, backend="torch"),
                               rtol=0, atol=0)


def test_auto_falls_back_to_torch_for_other_chunk_sizes(monkeypatch):
    monkeypatch.setattr(rat_triton_module, "rat_triton", _no_triton)
    monkeypatch.setattr(rat_triton_module, "chunk_summaries_triton", _no_triton)
    inputs, _ = _inputs(1, 20, 2, 32, None, torch.float32, seed=1)
    on_cuda = DEVICE.type == "cuda"  # where auto would have run Triton, the fallback says why
    with pytest.warns(UserWarning, match="chunk_size 4") if on_cuda else contextlib.nullcontext():
        rat(**inputs, chunk_size=4, backend="auto")
    with pytest.warns(UserWarning, match="chunk_size 4") if on_cuda else contextlib.nullcontext():
        chunk_summaries(inputs["k"], inputs["v"], inputs["g"], chunk_size=4, backend="auto")


def _bad(name: str):
    base, _ = _inputs(1, 16, 2, 32, None, torch.float32, seed=2)
    if name == "float64":
        return {k: t.double() for k, t in base.items()}
    if name == "head_dim_48":
        return _inputs(1, 16, 2, 48, None, torch.float32, seed=2)[0]
    if name == "non_contiguous":
        return {**base, "k": base["k"].transpose(-1, -2).contiguous().transpose(-1, -2)}
    if name == "mismatched_shapes":
        return {**base, "v": base["v"][:, :8]}
    if name == "mismatched_prefix":
        return {**base, "prefix_k": base["k"][:, :2], "prefix_v": base["v"][:, :3]}
    raise KeyError(name)


@pytest.mark.parametrize(
    "name, message",
    [
        ("float64", "dtype torch.float64"),
        ("head_dim_48", "head dim 48 is not supported"),
        ("non_contiguous", "k is not contiguous in its last dimension"),
        ("mismatched_shapes", "must share one"),
        ("mismatched_prefix", "prefix_k and prefix_v must share one"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_launch(name, message, monkeypatch):
    monkeypatch.setattr(rat_triton_module, "rat_triton", _no_triton)
    with pytest.raises(ValueError, match=message):
        rat(**_bad(name), chunk_size=8, backend="triton")


def test_unsupported_chunk_size_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rat_triton_module, "rat_triton", _no_triton)
    monkeypatch.setattr(rat_triton_module, "chunk_summaries_triton", _no_triton)
    inputs, _ = _inputs(1, 16, 2, 32, None, torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"rat: .*chunk_size 4 is not supported.*\(8, 16, 32, 64\)"):
        rat(**inputs, chunk_size=4, backend="triton")
    with pytest.raises(ValueError, match=r"chunk_summaries: .*chunk_size 4 is not supported"):
        chunk_summaries(inputs["k"], inputs["v"], inputs["g"], chunk_size=4, backend="triton")


def test_chunk_summaries_bad_input_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rat_triton_module, "chunk_summaries_triton", _no_triton)
    inputs, _ = _inputs(1, 16, 2, 48, None, torch.float32, seed=2)
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        chunk_summaries(inputs["k"], inputs["v"], inputs["g"], chunk_size=8, backend="triton")
    with pytest.raises(ValueError, match="must share one"):
        chunk_summaries(inputs["k"], inputs["v"][:, :8], inputs["g"], chunk_size=8, backend="triton")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
def test_device_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rat_triton_module, "rat_triton", _no_triton)
    inputs, _ = _inputs(1, 16, 2, 32, None, torch.float32, seed=2)
    with pytest.raises(ValueError, match="different devices"):
        rat(**{**inputs, "g": inputs["g"].cpu()}, chunk_size=8, backend="triton")
