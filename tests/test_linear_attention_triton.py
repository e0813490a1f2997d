"""The Triton backend of `kernels.linear_attention` against the float64 reference (naive.py).

Each case runs the kernels on inputs of the tested dtype and `linear_attention_naive` in
float64 on the same values, with random upstream gradients for the output and for the
returned state, and compares out, S_{T-1} and the gradients of q, k, v, initial_state.
With segment ids the references are chunk.py with the same ids and each document run
alone through naive.py. On CPU the kernels run in the Triton interpreter (fp32, fp16);
bf16 runs on a GPU only.

Tolerance: the shared per-dtype (atol, rtol) of tests/triton_testing.py, with atol taken
relative to the largest reference value of each tensor (`_assert_matches`). Outputs and
states grow with T when λ = 1 (a sum over all earlier tokens), and fp16 tiles round
relative to the largest term of a dot product, so an error bound in absolute units would
be either loose for small outputs or fail for large ones.
"""

import pytest
import torch

import kernels
from kernels.linear_attention import triton as linear_attention_triton_module
from kernels.linear_attention.chunk import linear_attention_chunk
from kernels.linear_attention.naive import linear_attention_naive
from kernels.linear_attention.triton import linear_attention_triton
from tests.triton_testing import DEVICE, DTYPES, assert_close, gpu, needs_gpu, poison_kernel_outputs  # noqa: F401


def _inputs(batch, seq_len, heads, key_dim, value_dim, decays, *, dtype, initial_dtype, seed, head_major=False):
    """Random q, k, v (scaled so λ = 1 sums stay well inside fp16), decay and S_{-1} (or None), on DEVICE.

    head_major: k and v are [B, H, T, D] tensors seen as [B, T, H, D] (strided, last dim contiguous).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype):
        return (0.5 * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)

    inputs = {
        "q": randn(batch, seq_len, heads, key_dim, dtype=dtype),
        "k": randn(batch, seq_len, heads, key_dim, dtype=dtype),
        "v": randn(batch, seq_len, heads, value_dim, dtype=dtype),
        "decay": torch.tensor(decays, dtype=torch.float32, device=DEVICE),
        "initial_state": None,
    }
    if head_major:
        inputs["k"] = randn(batch, heads, seq_len, key_dim, dtype=dtype).transpose(1, 2)
        inputs["v"] = randn(batch, heads, seq_len, value_dim, dtype=dtype).transpose(1, 2)
    if initial_dtype is not None:
        inputs["initial_state"] = randn(batch, heads, key_dim, value_dim, dtype=initial_dtype)
    return inputs


def _forward_backward(fn, inputs, *, grad_out: bool, grad_state: bool, seed):
    """fn(**inputs) -> (out, state); returns out, state and the grads of <out, g_o> + <state, g_s> (random g)."""
    leaves = {name: t.detach().clone().requires_grad_(name != "decay") if t is not None else None
              for name, t in inputs.items()}
    out, state = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    out_weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    state_weight = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss = 0
    if grad_out:
        loss = loss + (out.double() * out_weight).sum()
    if grad_state:
        loss = loss + (state.double() * state_weight).sum()
    names = [name for name, t in leaves.items() if t is not None and name != "decay"]
    # allow_unused: with the state's gradient alone, q is not on the reference's path to the loss.
    grads = torch.autograd.grad(loss, [leaves[name] for name in names], allow_unused=True, materialize_grads=True)
    return out, state, dict(zip(names, grads))


def _reference(**inputs):
    """naive.py in float64 on the same values."""
    as64 = {name: t.double() if t is not None else None for name, t in inputs.items()}
    return linear_attention_naive(**as64)


def _assert_matches(name, got, want, dtype):
    """`got` equals the float64 `want` within the dtype's tolerance, atol relative to max|want|."""
    magnitude = want.abs().max().clamp_min(1e-6)
    assert_close(name, got.double() / magnitude, want / magnitude, dtype)


def _compare(run, inputs, dtype, *, grad_out=True, grad_state=True, seed=0, references=None):
    """Run `run` once and each float64 reference ({label: fn}; naive.py by default) with the same
    upstream gradients, and compare everything."""
    references = {"naive": _reference} if references is None else references
    out, state, grads = _forward_backward(run, inputs, grad_out=grad_out, grad_state=grad_state, seed=seed)
    assert out.dtype == inputs["v"].dtype and state.dtype == torch.float32
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"grad {name}: dtype {grad.dtype}"
    for label, reference in references.items():
        ref_out, ref_state, ref_grads = _forward_backward(
            reference, inputs, grad_out=grad_out, grad_state=grad_state, seed=seed
        )
        _assert_matches(f"out vs {label}", out, ref_out, dtype)
        _assert_matches(f"state vs {label}", state, ref_state, dtype)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            _assert_matches(f"grad {name} vs {label}", grad, ref_grads[name], dtype)


def _public_op(return_state: bool):
    """kernels.linear_attention with backend="triton", as fn(**inputs) -> (out, state)."""

    def run(**inputs):
        result = kernels.linear_attention(**inputs, return_state=return_state, backend="triton")
        if return_state:
            return result
        # The state is not returned: compare it from a separate no-grad call, give it no gradient.
        with torch.no_grad():
            _, state = kernels.linear_attention(**inputs, return_state=True, backend="triton")
        return result, state

    return run


# (B, T, H, Dk, Dv, decays, initial_state dtype ("input" = the tested dtype), return_state)
PUBLIC_CASES = [
    pytest.param(2, 37, 2, 64, 64, [0.5, 1.0], torch.float32, True, id="T37-d64-fp32state"),
    pytest.param(1, 150, 2, 128, 64, [0.9, 0.999], None, True, id="T150-dk128-dv64-nostate"),
    pytest.param(1, 70, 2, 64, 128, [1.0, 0.5], "input", False, id="T70-dk64-dv128-outonly"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,decays,initial_dtype,return_state", PUBLIC_CASES)
def test_public_op_matches_reference(batch, seq_len, heads, key_dim, value_dim, decays, initial_dtype,
                                     return_state, dtype):
    """backend="triton": forward and every gradient; T not a multiple of the 64-row block."""
    initial_dtype = dtype if initial_dtype == "input" else initial_dtype
    inputs = _inputs(batch, seq_len, heads, key_dim, value_dim, decays, dtype=dtype, initial_dtype=initial_dtype,
                     seed=seq_len + key_dim)
    _compare(_public_op(return_state), inputs, dtype, grad_state=return_state, seed=seq_len)


# The public op runs segments of 512 tokens; small blocks and segments put the segment
# states, their scan and the reverse scan of the backward under test at small T.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len,block_size,segment_blocks,decays,with_initial,head_major", [
    pytest.param(150, 16, 2, [0.5, 0.999], True, True, id="T150-5segments-partial-head-major"),
    pytest.param(128, 16, 2, [1.0, 0.9], False, False, id="T128-4full-segments"),
    pytest.param(37, 16, 1, [0.9, 1.0], True, False, id="T37-1block-segments"),
])
def test_segments_match_reference(seq_len, block_size, segment_blocks, decays, with_initial, head_major, dtype):
    inputs = _inputs(1, seq_len, 2, 32, 64, decays, dtype=dtype, initial_dtype=torch.float32 if with_initial else None,
                     seed=seq_len + segment_blocks, head_major=head_major)
    if head_major:
        assert inputs["k"].stride(1) == 32 and not inputs["k"].is_contiguous()

    def run(**x):
        assert not (head_major and x["k"].is_contiguous()), "the strided layout must reach the kernels"
        return linear_attention_triton(**x, block_size=block_size, segment_blocks=segment_blocks)

    _compare(run, inputs, dtype, seed=seq_len)


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_the_state_gets_a_gradient(dtype):
    """LASP's use: the state's gradient alone reaches k, v and S_{-1} (none reaches q); T = 1 and T = 65."""
    for seq_len in (1, 65):
        inputs = _inputs(2, seq_len, 2, 64, 32, [0.5, 1.0], dtype=dtype, initial_dtype=dtype, seed=seq_len)
        run = _public_op(return_state=True)
        out, state, grads = _forward_backward(run, inputs, grad_out=False, grad_state=True, seed=1)
        assert torch.count_nonzero(grads["q"]) == 0
        _compare(run, inputs, dtype, grad_out=False, seed=1)


@pytest.mark.parametrize("wanted", ["q", "k", "initial_state"])
def test_gradient_of_one_input(wanted):
    """Only one input requires grad: the backward skips the passes nobody needs and still gets it right."""
    inputs = _inputs(1, 40, 2, 16, 32, [0.9, 1.0], dtype=torch.float32, initial_dtype=torch.float32, seed=7)
    gen = torch.Generator().manual_seed(8)
    out_weight = torch.randn(1, 40, 2, 32, generator=gen, dtype=torch.float64).to(DEVICE)
    state_weight = torch.randn(1, 2, 16, 32, generator=gen, dtype=torch.float64).to(DEVICE)

    def gradient(fn, x):
        leaf = x[wanted].clone().requires_grad_(True)
        out, state = fn(**{**x, wanted: leaf})
        loss = (out.double() * out_weight).sum() + (state.double() * state_weight).sum()
        return torch.autograd.grad(loss, leaf)[0]

    got = gradient(lambda **x: kernels.linear_attention(**x, return_state=True, backend="triton"), inputs)
    want = gradient(linear_attention_naive, {name: t.double() for name, t in inputs.items()})
    _assert_matches(f"grad {wanted}", got, want, torch.float32)


def _packed_segment_ids(seq_len, block_size, *, seed, dtype):
    """`[2, T]` ids: row 0 packs documents of random lengths, row 1 is one document.

    Row 0 opens with documents of 1, 2 and 3 tokens and one that ends on the first block
    boundary, so the next one starts exactly at it; then lengths up to two blocks and a bit
    (crossing block and segment boundaries), every third one at most 3 tokens. Ids start
    above 0 and the rows' ids overlap, as nothing requires otherwise.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 3, block_size - 6]
    while sum(lengths) < seq_len:
        longest = 3 if len(lengths) % 3 == 0 else 2 * block_size + 3
        lengths.append(int(torch.randint(1, longest + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - seq_len
    packed = 5 + torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    one_document = torch.full((seq_len,), 7)
    return torch.stack([packed, one_document]).to(device=DEVICE, dtype=dtype)


def _blocked_reference(segment_ids):
    """chunk.py in float64 with the same segment ids, as fn(**inputs) -> (out, state)."""

    def run(**inputs):
        as64 = {name: t.double() if t is not None else None for name, t in inputs.items()}
        return linear_attention_chunk(**as64, segment_ids=segment_ids)

    return run


def _each_document_alone(segment_ids):
    """naive.py in float64 on each document by itself, outputs put back in place: what segment ids mean.

    A row's first document starts from its initial_state; its last one gives the final state.
    """

    def run(q, k, v, decay, initial_state):
        outs, states = [], []
        for row, ids in enumerate(segment_ids):
            _, lengths = torch.unique_consecutive(ids, return_counts=True)
            pieces, start = [], 0
            for index, length in enumerate(lengths.tolist()):
                span = slice(start, start + length)
                initial = initial_state[row : row + 1] if initial_state is not None and index == 0 else None
                out, state = _reference(q=q[row : row + 1, span], k=k[row : row + 1, span], v=v[row : row + 1, span],
                                        decay=decay, initial_state=initial)
                pieces.append(out)
                start += length
            outs.append(torch.cat(pieces, dim=1))
            states.append(state)
        return torch.cat(outs), torch.cat(states)

    return run


# Small blocks and segments put every launch (segment states, their scan, the reverse scan)
# under the documents' masks at T ~ 150; T = 128 makes the blocks of the reverse passes
# start on the same tokens as the forward's, so a document starts at a block boundary in
# both directions. "public" runs the op with its own 64-row blocks.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len,block_size,segment_blocks,decays,initial_dtype,ids_dtype", [
    pytest.param(150, 16, 2, [0.9, 1.0], torch.float32, torch.int64, id="T150-b16-5segments-fp32state-int64"),
    pytest.param(128, 16, 2, [1.0, 0.8], None, torch.int32, id="T128-b16-4segments-nostate-int32"),
    pytest.param(150, None, None, [0.99, 0.5], "input", torch.int64, id="T150-public-op-inputstate"),
])
def test_documents_match_torch_and_each_alone(seq_len, block_size, segment_blocks, decays, initial_dtype, ids_dtype,
                                              dtype):
    """segment_ids: out, final state and every gradient equal chunk.py's and each document's alone."""
    initial_dtype = dtype if initial_dtype == "input" else initial_dtype
    inputs = _inputs(2, seq_len, 2, 16, 16, decays, dtype=dtype, initial_dtype=initial_dtype, seed=seq_len + 3)
    segment_ids = _packed_segment_ids(seq_len, block_size or 64, seed=seq_len, dtype=ids_dtype)

    def run(**x):
        if block_size is None:
            return kernels.linear_attention(**x, segment_ids=segment_ids, return_state=True, backend="triton")
        return linear_attention_triton(**x, segment_ids=segment_ids, block_size=block_size,
                                       segment_blocks=segment_blocks)

    references = {"chunk.py": _blocked_reference(segment_ids), "each alone": _each_document_alone(segment_ids)}
    _compare(run, inputs, dtype, seed=seq_len, references=references)


@pytest.mark.parametrize("with_segment_ids", [False, True], ids=["plain", "segment-ids"])
def test_auto_runs_torch_on_cpu(with_segment_ids, monkeypatch):
    """No silent Triton on CPU tensors, even under the interpreter."""
    monkeypatch.setattr(linear_attention_triton_module, "linear_attention_triton", _never_called)
    inputs = _inputs(1, 20, 2, 16, 16, [0.9, 1.0], dtype=torch.float32, initial_dtype=torch.float32, seed=5)
    inputs = {name: t.cpu() for name, t in inputs.items()}
    if with_segment_ids:
        inputs["segment_ids"] = torch.tensor([[0] * 6 + [1] * 14])
    out, state = kernels.linear_attention(**inputs, return_state=True)
    want_out, want_state = kernels.linear_attention(**inputs, return_state=True, backend="torch")
    assert torch.equal(out, want_out) and torch.equal(state, want_state)


def _never_called(*args, **kwargs):
    raise AssertionError("the Triton kernels ran although the inputs should have been refused first")


def _good_inputs():
    return _inputs(1, 20, 2, 16, 32, [0.9, 1.0], dtype=torch.float32, initial_dtype=torch.float32, seed=6)


@pytest.mark.parametrize("change,message", [
    pytest.param(lambda x: {"q": x["q"].double(), "k": x["k"].double(), "v": x["v"].double()},
                 r"backend='triton' cannot run: q has dtype torch.float64", id="float64"),
    pytest.param(lambda x: {"q": torch.cat([x["q"]] * 3, -1), "k": torch.cat([x["k"]] * 3, -1), "initial_state": None},
                 r"head dim 48 is not supported; the Triton kernels take \[16, 32, 64, 128\]", id="head-dim-48"),
    pytest.param(lambda x: {"v": x["v"].transpose(-1, -2).contiguous().transpose(-1, -2)},
                 r"v is not contiguous in its last dimension", id="non-contiguous"),
    pytest.param(lambda x: {"k": x["k"][:, :-1]}, r"disagree on T: \{'q': 20, 'k': 19, 'v': 20\}", id="shape"),
    pytest.param(lambda x: {"initial_state": x["initial_state"][..., :16]},
                 r"initial_state must be \[B, H, Dk, Dv\]", id="state-shape"),
    pytest.param(lambda x: {"k": x["k"].half()}, r"q, k, v must share one dtype", id="mixed-dtypes"),
    pytest.param(lambda x: {"decay": x["decay"].clone().requires_grad_(True)},
                 r"decay requires grad and the Triton kernels do not differentiate it", id="decay-requires-grad"),
    pytest.param(lambda x: {"segment_ids": torch.zeros(1, 19, dtype=torch.long, device=DEVICE)},
                 r"segment_ids of shape \(1, 19\) does not match the sequence", id="segment-ids-shape"),
])
def test_bad_input_raises_before_any_launch(change, message, monkeypatch):
    monkeypatch.setattr(linear_attention_triton_module, "linear_attention_triton", _never_called)
    inputs = _good_inputs()
    inputs.update(change(inputs))
    with pytest.raises(ValueError, match=message):
        kernels.linear_attention(**inputs, backend="triton")


def test_learned_decay_runs_torch_under_auto(monkeypatch):
    """decay.requires_grad: "auto" runs the torch backend (which differentiates decay) without a fuss."""
    monkeypatch.setattr(linear_attention_triton_module, "linear_attention_triton", _never_called)
    inputs = _good_inputs()
    inputs["decay"] = inputs["decay"].clone().requires_grad_(True)
    kernels.linear_attention(**inputs).sum().backward()
    assert inputs["decay"].grad is not None


@gpu
@needs_gpu
@pytest.mark.parametrize("moved", ["v", "decay", "initial_state", "segment_ids"])
def test_device_mismatch_raises(moved, monkeypatch):
    monkeypatch.setattr(linear_attention_triton_module, "linear_attention_triton", _never_called)
    inputs = {**_good_inputs(), "segment_ids": torch.zeros(1, 20, dtype=torch.long, device=DEVICE)}
    inputs[moved] = inputs[moved].cpu()
    with pytest.raises(ValueError, match=r"(different devices|decay is on cpu|segment_ids are on cpu)"):
        kernels.linear_attention(**inputs, backend="triton")
