"""The Triton backend of `kernels.attention` against its float64 definition (kernels/attention/naive.py).

Each case runs the kernel (backend="triton") on random inputs of the tested dtype and the
reference on the same values in float64, with random upstream gradients for out and for
lse, and compares out, lse and dq, dk, dv. With segment ids (documents packed in a row) the
references are the torch backend with the same ids and attention run on each document alone.
Without CUDA the kernels run in the Triton interpreter on CPU (fp32, fp16); with CUDA the
same cases run compiled, bf16 included.
Kernel outputs are NaN-filled before every launch (poison_kernel_outputs), so an element
a kernel does not write fails the finiteness check.

Tolerances: tests/triton_testing.TOLERANCES per dtype (fp32 errors here are ~1e-6, fp16
errors at most ~0.7 of the tolerance). bf16 gradients get 2x: dS = P (dP - delta) is
rounded to the input dtype before its dots with K and Q (as flash attention does, for
tensor-core speed), and bf16 runs only on a GPU, so its margin could not be measured here.
"""

import importlib
import warnings
from bisect import bisect_left, bisect_right

import pytest
import torch

import kernels
from kernels.attention import naive
from kernels.backend import pick_backend
from kernels.segments import positions_in_document
from tests.triton_testing import DEVICE, DTYPES, assert_close, gpu, poison_kernel_outputs  # noqa: F401

triton_attention = importlib.import_module("kernels.attention.triton")

GRAD_TOLERANCE_SCALE = {torch.float32: 1.0, torch.float16: 1.0, torch.bfloat16: 2.0}


def _pattern(block_size, local_blocks, vert_stride, num_heads, head_start):
    """An S2Pattern; its coverage warning (some patterns below leave blocks unseen on purpose) is not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.S2Pattern(block_size, local_blocks, vert_stride, num_heads, head_start)


# name: (B, H, Tq, Tk, D, options). T values are no multiple of any block size (16..128).
CASES = {
    "causal_d64": (2, 2, 100, 100, 64, dict(causal=True)),
    "full_tq_ne_tk_d32_scale": (1, 2, 37, 70, 32, dict(causal=False, scale=0.3)),
    "causal_d128_offsets": (1, 2, 70, 90, 128, dict(causal=True, q_start=40, k_start=10)),
    "causal_d16": (1, 2, 45, 45, 16, dict(causal=True)),
    "window": (1, 2, 100, 100, 32, dict(causal=True, window=20)),
    "window_noncausal_offsets": (1, 2, 60, 90, 32, dict(causal=False, window=15, q_start=50, k_start=30)),
    "s2_block16_head_start": (1, 3, 150, 150, 32, dict(causal=True, s2=(16, 1, 4, 4, 1))),
    "s2_block32_offsets": (1, 2, 60, 130, 64, dict(causal=True, s2=(32, 2, 3, 4, 2), q_start=75, k_start=5)),
    "s2_window": (1, 2, 100, 100, 32, dict(causal=True, window=40, s2=(16, 1, 3, 2, 0))),
    "queries_partly_before_keys": (2, 2, 45, 40, 32, dict(causal=True, q_start=10, k_start=30)),
    "queries_wholly_before_keys": (1, 2, 40, 50, 64, dict(causal=True, q_start=0, k_start=60)),
}
# fp32 runs every case; fp16 (and bf16 on a GPU) a spread of them, to keep the interpreter time down.
LOW_PRECISION_CASES = ["causal_d64", "causal_d128_offsets", "window_noncausal_offsets", "s2_block16_head_start",
                       "s2_block32_offsets", "queries_partly_before_keys"]
RUNS = [pytest.param(name, torch.float32, id=f"{name}-fp32") for name in CASES] + [
    pytest.param(name, dtype.values[0], id=f"{name}-{dtype.id}", marks=dtype.marks)
    for name in LOW_PRECISION_CASES
    for dtype in DTYPES
    if dtype.values[0] != torch.float32
]


def _case_inputs(name: str, dtype: torch.dtype):
    batch, heads, q_len, k_len, dim, options = CASES[name]
    options = dict(options)
    if "s2" in options:
        options["s2"] = _pattern(*options["s2"])
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    q, k, v = (torch.randn(batch, n, heads, dim, generator=gen) for n in (q_len, k_len, k_len))
    grad_out = torch.randn(batch, q_len, heads, dim, generator=gen)
    # Every row gets an upstream lse gradient, empty rows too: it must not leak into q, k, v.
    grad_lse = torch.randn(batch, heads, q_len, generator=gen)
    # Round once to the tested dtype, so the kernel and the reference see the same values.
    q, k, v, grad_out = (t.to(dtype).to(DEVICE) for t in (q, k, v, grad_out))
    return q, k, v, grad_out, grad_lse.to(DEVICE), options


def _run(attend, q, k, v, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of attend(q, k, v) -> (out, lse) under the upstream gradients."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attend(q, k, v)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return out, lse, *grads


@pytest.mark.parametrize("name, dtype", RUNS)
def test_matches_float64_reference(name, dtype):
    q, k, v, grad_out, grad_lse, options = _case_inputs(name, dtype)
    scale = options.pop("scale", q.shape[-1] ** -0.5)
    mask = dict(window=None, s2=None, q_start=0, k_start=0) | options

    got = _run(
        lambda q, k, v: kernels.attention(q, k, v, scale=scale, return_lse=True, backend="triton", **mask),
        q, k, v, grad_out, grad_lse,
    )
    want = _run(
        lambda q, k, v: naive.attention_naive(q, k, v, scale=scale, **mask),
        q.double(), k.double(), v.double(), grad_out.double(), grad_lse.double(),
    )
    empty = _assert_matches(got, want, dtype)
    out, _, *grads = got
    if name == "queries_wholly_before_keys":
        assert empty.all() and (out == 0).all() and all((g == 0).all() for g in grads)


def _assert_matches(got, want, dtype, reference="reference"):
    """Kernel (out, lse, dq, dk, dv) against a float64 reference; returns the rows that see no key `[B, H, Tq]`."""
    out, lse, *grads = got
    want_out, want_lse, *want_grads = want
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert_close(f"out vs {reference}", out, want_out, dtype)
    # Rows that see no key: lse exactly -inf, and out exactly 0.
    empty = want_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), f"lse: the -inf rows differ from the {reference}"
    assert_close(f"lse (finite rows) vs {reference}", lse[~empty], want_lse[~empty], dtype)
    assert (out.transpose(1, 2)[empty] == 0).all(), "out: rows that see no key must be exactly 0"
    for label, grad, want_grad in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(f"{label} vs {reference}", grad, want_grad, dtype, scale=GRAD_TOLERANCE_SCALE[dtype])
    return empty


def test_strided_inputs_and_no_lse_output():
    """Inputs with a contiguous last dim but other strides work as they are; without lse, backward gets no dlse."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 50, 32, generator=gen).to(DEVICE).transpose(1, 2)  # [B, T, H, D] view of [B, H, T, D]
    kv = torch.randn(1, 60, 2, 64, generator=gen).to(DEVICE)
    k, v = kv[..., :32], kv[..., 32:]  # slices of one tensor: time stride 128
    grad_out = torch.randn(1, 50, 2, 32, generator=gen).to(DEVICE)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*leaves, causal=True, q_start=10, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    def reference(q, k, v):
        return naive.attention_naive(q, k, v, causal=True, window=None, s2=None, q_start=10, k_start=0, scale=32**-0.5)

    no_grad_lse = torch.zeros(1, 2, 50, dtype=torch.float64, device=DEVICE)
    want = _run(reference, q.double(), k.double(), v.double(), grad_out.double(), no_grad_lse)
    for label, got, want_value in zip(("out", "dq", "dk", "dv"), (out, *grads), (want[0], *want[2:])):
        assert_close(label, got, want_value, torch.float32)


def test_s2_skips_key_tiles_that_no_query_sees():
    """The forward kernel computes exactly the key tiles that hold a visible element, and skips the rest.

    Non-aligned offsets make tiles straddle S2 blocks; a wide vert_stride leaves whole tiles unseen.
    """
    heads, length, q_start, k_start = 4, 300, 37, 5
    s2 = _pattern(32, 1, 8, 4, 0)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, length, heads, 16, generator=gen).to(DEVICE) for _ in range(3))
    mask_spec = triton_attention.MaskSpec(causal=True, window=None, s2=s2, q_start=q_start, k_start=k_start)
    _, _, tiles = triton_attention.forward(q, k, v, mask_spec, 0.25, count_tiles=True)

    block_m, block_n = _forward_tile_sizes()
    positions = torch.arange(length)
    visible = naive.visible_mask(
        q_start + positions, k_start + positions, causal=True, window=None, s2=s2, heads=heads
    )  # [H, Tq, Tk]
    q_tiles, k_tiles = -(-length // block_m), -(-length // block_n)
    want = _tiles_with_visible_elements(visible, block_m, block_n)
    assert torch.equal(tiles[:, :q_tiles].cpu(), want)
    causal_tiles = sum(min(k_tiles, -(-(q_start + min((t + 1) * block_m, length) - k_start) // block_n))
                       for t in range(q_tiles)) * heads
    assert 0 < want.sum() < causal_tiles  # S2 skips some of the tiles that the causal bound alone would visit


def _forward_tile_sizes() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward kernel's last launch."""
    config = triton_attention._forward_kernel.best_config.kwargs
    return config["BLOCK_M"], config["BLOCK_N"]


def _tiles_with_visible_elements(visible, block_m, block_n):
    """int32 `[H, query tiles]`: how many key tiles hold a visible element, from a mask `[H, Tq, Tk]`."""
    heads, q_len, k_len = visible.shape
    q_tiles, k_tiles = -(-q_len // block_m), -(-k_len // block_n)
    padded = torch.zeros(heads, q_tiles * block_m, k_tiles * block_n, dtype=torch.bool)
    padded[:, :q_len, :k_len] = visible
    tile_seen = padded.view(heads, q_tiles, block_m, k_tiles, block_n).any(dim=(2, 4))  # [H, q tiles, k tiles]
    return tile_seen.sum(-1).to(torch.int32)


# --------------------------------------------------------------------------- #
# Documents: segment ids
# --------------------------------------------------------------------------- #
def _document_lengths(total: int, gen: torch.Generator, longest: int = 70) -> list[int]:
    """Random lengths summing to total: about half of 1-3 tokens, the others up to `longest` (crossing tiles)."""
    lengths = []
    while sum(lengths) < total:
        short = bool(torch.rand((), generator=gen) < 0.5)
        low, high = (1, 3) if short else (4, longest)
        lengths.append(int(torch.randint(low, high + 1, (), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def _ids(lengths: list[int], first_id: int = 0) -> list[int]:
    """Segment ids of documents of these lengths, numbered from first_id."""
    return [first_id + doc for doc, length in enumerate(lengths) for _ in range(length)]


# name: (Tq, Tk, options), with B=2, H=2, D=16; row 0 holds random documents (_document_inputs).
DOCUMENT_CASES = {
    "causal": (150, 150, dict(causal=True)),
    "window_offsets": (150, 150, dict(causal=True, window=24, q_start=30, k_start=30)),
    "s2_offsets": (150, 150, dict(causal=True, s2=(16, 1, 3, 2, 0), q_start=10, k_start=10)),
    # Ring attention: queries at 90..189, keys of another rank at 0..89, with their own ids.
    "ring": (100, 90, dict(causal=True, q_start=90, k_start=0)),
    # RAT-SP: full attention over keys with ids of their own, some in no query's document.
    "noncausal_key_ids": (120, 70, dict(causal=False)),
}
DOCUMENT_RUNS = [
    pytest.param(name, dtype.values[0], id=f"{name}-{dtype.id}", marks=dtype.marks)
    for name in DOCUMENT_CASES
    for dtype in DTYPES
]


def _document_inputs(name: str, dtype: torch.dtype):
    """q, k, v, upstream gradients and options with segment ids for a DOCUMENT_CASES entry.

    Row 0 holds documents of random lengths (some of 1-3 tokens, some crossing tiles). Row 1 is
    one document, except in "ring", where the keys' two documents are none of the queries'
    (all its rows see nothing), and in "noncausal_key_ids", where the queries' first document
    has no keys and some keys belong to no query's document.
    """
    q_len, k_len, options = DOCUMENT_CASES[name]
    options = dict(options)
    if "s2" in options:
        options["s2"] = _pattern(*options["s2"])
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "ring":
        # Ids of the whole sequence 0..189; the keys' block comes first. Slices keep a batch stride of 190.
        ids = torch.tensor([_ids(_document_lengths(190, gen)), _ids([40, 50, 100])])
        options.update(segment_ids=ids[:, k_len:], k_segment_ids=ids[:, :k_len])
    elif name == "noncausal_key_ids":
        q_ids = _ids(_document_lengths(q_len, gen), first_id=1)
        # Sorted random ids from below the first query's to above the last's. The queries' ids are
        # int32, the keys' int64: both dtypes, and the two mixed.
        k_ids = torch.randint(0, q_ids[-1] + 3, (k_len,), generator=gen).sort().values.tolist()
        options.update(
            segment_ids=torch.tensor([q_ids, [4] * 50 + [5] * (q_len - 50)], dtype=torch.int32),
            k_segment_ids=torch.tensor([k_ids, [3] * 10 + [5] * 30 + [7] * 30]),
        )
    else:
        options.update(segment_ids=torch.tensor([_ids(_document_lengths(q_len, gen)), [5] * q_len]))
    q, k, v = (torch.randn(2, n, 2, 16, generator=gen) for n in (q_len, k_len, k_len))
    grad_out = torch.randn(2, q_len, 2, 16, generator=gen)
    grad_lse = torch.randn(2, 2, q_len, generator=gen)
    q, k, v, grad_out = (t.to(dtype).to(DEVICE) for t in (q, k, v, grad_out))
    for key in ("segment_ids", "k_segment_ids"):
        if key in options:
            options[key] = options[key].to(DEVICE)
    return q, k, v, grad_out, grad_lse.to(DEVICE), options


def _each_document_alone(q, k, v, *, segment_ids, k_segment_ids=None, s2=None, q_start=0, k_start=0, **options):
    """(out, lse) of the torch backend run on each document's queries and keys alone, put back in place.

    Causal and window rules see only distances, which the documents' global starts keep; S2
    counts its blocks from each document's start. A document without keys here: out 0, lse -inf.
    """
    k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
    outs, lses = [], []
    for row in range(q.shape[0]):
        q_ids, k_ids = segment_ids[row].tolist(), k_segment_ids[row].tolist()
        row_outs, row_lses = [], []
        for doc in sorted(set(q_ids)):
            r0, r1 = bisect_left(q_ids, doc), bisect_right(q_ids, doc)
            c0, c1 = bisect_left(k_ids, doc), bisect_right(k_ids, doc)
            queries = q[row : row + 1, r0:r1]
            if c0 == c1:
                row_outs.append(torch.zeros_like(queries))
                row_lses.append(torch.full((1, q.shape[2], r1 - r0), float("-inf"), dtype=q.dtype, device=q.device))
                continue
            starts = dict(q_start=0, k_start=0) if s2 is not None else dict(q_start=q_start + r0, k_start=k_start + c0)
            out, lse = kernels.attention(
                queries, k[row : row + 1, c0:c1], v[row : row + 1, c0:c1], s2=s2, **starts, **options,
                return_lse=True, backend="torch",
            )
            row_outs.append(out)
            row_lses.append(lse)
        outs.append(torch.cat(row_outs, dim=1))
        lses.append(torch.cat(row_lses, dim=-1))
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("name, dtype", DOCUMENT_RUNS)
def test_documents_match_torch_and_each_document_alone(name, dtype):
    """With segment ids the kernels give what the torch backend gives, and what each document alone gives."""
    q, k, v, grad_out, grad_lse, options = _document_inputs(name, dtype)
    got = _run(
        lambda q, k, v: kernels.attention(q, k, v, return_lse=True, backend="triton", **options),
        q, k, v, grad_out, grad_lse,
    )
    float64 = (q.double(), k.double(), v.double(), grad_out.double(), grad_lse.double())
    torch_backend = _run(
        lambda q, k, v: kernels.attention(q, k, v, return_lse=True, backend="torch", **options), *float64
    )
    alone = _run(lambda q, k, v: _each_document_alone(q, k, v, **options), *float64)
    _assert_matches(got, torch_backend, dtype, "torch backend")
    empty = _assert_matches(got, alone, dtype, "each document alone")

    # What no pair connects is exactly zero: dq of rows that see no key, dk and dv of keys no query's document holds.
    _, _, dq, dk, dv = got
    assert (dq.transpose(1, 2)[empty] == 0).all()
    q_ids = options["segment_ids"]
    k_ids = options.get("k_segment_ids", q_ids)
    orphans = torch.stack([~torch.isin(k_ids[row], q_ids[row]) for row in range(k_ids.shape[0])])  # [B, Tk]
    assert (dk[orphans] == 0).all() and (dv[orphans] == 0).all()
    if name in ("ring", "noncausal_key_ids"):
        assert empty.any() and orphans.any()  # the cases hold both, as meant


def test_documents_skip_key_tiles_of_other_documents():
    """With many short documents the forward kernel visits only the key tiles of each query tile's documents.

    Causal: exactly the tiles that meet [first key of the tile's first row's document, the tile's
    last row], far fewer than without segment ids. S2 on top, on a long document: it skips further,
    as S2 counts blocks from each document's start, but never a tile holding a visible element.
    """
    heads, length = 2, 300
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, length, heads, 16, generator=gen).to(DEVICE) for _ in range(3))
    causal = triton_attention.MaskSpec(causal=True, window=None, s2=None, q_start=0, k_start=0)

    ids = _ids(_document_lengths(length, gen, longest=20))
    documents = triton_attention.DocumentSpec.of(torch.tensor([ids], device=DEVICE), None, None)
    _, _, tiles = triton_attention.forward(q, k, v, causal, 0.25, documents=documents, count_tiles=True)
    _, _, tiles_without_segments = triton_attention.forward(q, k, v, causal, 0.25, count_tiles=True)
    block_m, block_n = _forward_tile_sizes()
    q_tiles = -(-length // block_m)
    # Key tiles from the one holding the first key of the first row's document to the causal end.
    want = [-(-min(row0 + block_m, length) // block_n) - bisect_left(ids, ids[row0]) // block_n
            for row0 in range(0, length, block_m)]
    assert tiles[:, :q_tiles].cpu().tolist() == [want] * heads
    assert sum(want) * heads < tiles_without_segments[:, :q_tiles].sum()

    # A long document, so that S2 leaves whole key tiles of it unseen from query tiles that lie
    # inside it (the test is conservative on a tile that straddles documents).
    s2 = _pattern(16, 1, 8, heads, 0)
    segment_ids = torch.tensor([_ids([3, 253, 44])], device=DEVICE)
    documents = triton_attention.DocumentSpec.of(segment_ids, None, s2)
    s2_mask = triton_attention.MaskSpec(causal=True, window=None, s2=s2, q_start=0, k_start=0)
    _, _, s2_tiles = triton_attention.forward(q, k, v, s2_mask, 0.25, documents=documents, count_tiles=True)
    _, _, document_tiles = triton_attention.forward(q, k, v, causal, 0.25, documents=documents, count_tiles=True)
    positions = positions_in_document(segment_ids)[0].cpu()
    same_document = segment_ids[0, :, None] == segment_ids[0, None, :]
    visible = s2.token_mask(positions, positions, heads) & same_document.cpu()  # [H, T, T]
    s2_tiles, document_tiles = s2_tiles[:, :q_tiles].cpu(), document_tiles[:, :q_tiles].cpu()
    assert (s2_tiles >= _tiles_with_visible_elements(visible, block_m, block_n)).all()
    assert (s2_tiles <= document_tiles).all() and s2_tiles.sum() < document_tiles.sum()


def test_auto_runs_torch_on_cpu(monkeypatch):
    """No silent Triton on CPU: "auto" gives CPU tensors to the torch backend, even under the interpreter."""
    def no_launch(*args, **kwargs):
        raise AssertionError("the Triton backend ran on CPU tensors with backend='auto'")

    monkeypatch.setattr(triton_attention, "attention_triton", no_launch)
    q, k, v = (torch.randn(1, 20, 2, 32) for _ in range(3))
    assert pick_backend("attention", "auto", {"q": q, "k": k, "v": v}, head_dims=(32,)) == "torch"
    out = kernels.attention(q, k, v, causal=True, backend="auto")
    assert out.shape == q.shape


def _bad(dtype=torch.float32, dim=32, v_len=20, strided_k=False):
    q, k = (torch.randn(1, 20, 2, dim, device=DEVICE).to(dtype) for _ in range(2))
    v = torch.randn(1, v_len, 2, dim, device=DEVICE).to(dtype)
    if strided_k:
        k = torch.randn(1, 20, 2, 2 * dim, device=DEVICE).to(dtype)[..., ::2]
    return q, k, v


BAD_INPUTS = {
    "float64": (lambda: _bad(dtype=torch.float64), r"q has dtype torch.float64"),
    "head_dim_48": (lambda: _bad(dim=48), r"head dim 48 is not supported; the Triton kernels take \[16, 32, 64, 128\]"),
    "k_last_dim_strided": (lambda: _bad(strided_k=True), r"k is not contiguous in its last dimension"),
    "mismatched_shapes": (lambda: _bad(v_len=21), r"k, v \[B, Tk, H, D\] must agree"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_launch(name, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("the Triton backend was called with inputs it should have refused")

    monkeypatch.setattr(triton_attention, "attention_triton", no_launch)
    make, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        kernels.attention(*make(), causal=True, backend="triton")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
def test_device_mismatch_raises_before_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("the Triton backend was called with tensors on two devices")

    monkeypatch.setattr(triton_attention, "attention_triton", no_launch)
    q, k, v = (torch.randn(1, 20, 2, 32, device="cuda") for _ in range(3))
    with pytest.raises(ValueError, match="tensors are on different devices"):
        kernels.attention(q, k.cpu(), v, causal=True, backend="triton")
