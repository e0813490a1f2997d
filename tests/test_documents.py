"""Packed documents kept apart (`segment_ids`): every op, every sequence-parallel path, the model.

The reference is the definition itself: each document run alone through the same op (the
torch kernels, float64), outputs put back in place and gradients taken with the same upstream
gradient. A packed batch holds documents of random lengths: some shorter than a RAT chunk,
some straddling chunk and rank boundaries, and a row that is one document spanning the window.
One metric: max|a - b| / max|b| (b = the reference), at most 1e-10 (float64 end to end).
"""

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import kernels
import parallel
from kernels import S2Pattern
from kernels.linear_attention import linear_attention_naive
from kernels.rat.naive import rat_naive
from kernels.segments import positions_in_document
from lsys.models.config import ModelConfig
from lsys.models.lm import LM
from parallel import World, init_mesh
from parallel.layout import LAYOUTS, SequenceLayout
from tests.local_ranks import run_local_ranks

TOLERANCE = 1e-10
BATCH, HEADS, HEAD_DIM = 2, 4, 8
CHUNK = 4  # RAT chunk size in the op tests
S2 = S2Pattern(block_size=16, local_blocks=1, vert_stride=4, num_heads=HEADS)
DECAY = torch.tensor([0.99, 0.9, 0.7, 0.5], dtype=torch.float64)


def _rel_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def packed_segment_ids(seq_len: int, seed: int, longest: int = 3 * CHUNK + 2) -> Tensor:
    """`[2, T]`: row 0 documents of random lengths 1..longest (the first two shorter than a chunk), row 1 one
    document."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, CHUNK - 1]
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(1, longest + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - seq_len
    row = torch.cat([torch.full((n,), doc) for doc, n in enumerate(lengths) if n > 0])
    return torch.stack([row, torch.zeros(seq_len, dtype=torch.long)])


def each_alone(
    op: Callable[..., Tensor | tuple[Tensor, ...]], inputs: list[Tensor], upstream: list[Tensor], segment_ids: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """`op` on every document of every row alone: its outputs and the inputs' gradients, put back in place.

    Inputs and outputs are `[B, T, ...]` except outputs listed in `upstream` as `[B, H, T]` (lse).
    """
    outputs = [torch.zeros_like(u) for u in upstream]
    grads = [torch.zeros_like(x) for x in inputs]
    for row in range(segment_ids.shape[0]):
        _, lengths = torch.unique_consecutive(segment_ids[row], return_counts=True)
        start = 0
        for length in lengths.tolist():
            span = slice(start, start + length)
            leaves = [x[row : row + 1, span].detach().requires_grad_() for x in inputs]
            results = op(*leaves)
            results = results if isinstance(results, tuple) else (results,)
            pieces = []
            for index, (result, u) in enumerate(zip(results, upstream)):
                time_last = u.dim() == 3  # lse [B, H, T]
                target = outputs[index][row : row + 1, ..., span] if time_last else outputs[index][row : row + 1, span]
                target.copy_(result.detach())
                pieces.append(u[row : row + 1, ..., span] if time_last else u[row : row + 1, span])
            for grad, piece in zip(grads, torch.autograd.grad(results, leaves, pieces)):
                grad[row : row + 1, span] = piece
            start += length
    return outputs, grads


def packed(
    op: Callable[..., Tensor | tuple[Tensor, ...]], inputs: list[Tensor], upstream: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """`op` on the packed inputs: its outputs and the inputs' gradients."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    results = op(*leaves)
    results = results if isinstance(results, tuple) else (results,)
    grads = torch.autograd.grad(results, leaves, upstream)
    return [r.detach() for r in results], list(grads)


def _random(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def op_inputs(name: str, seq_len: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Fresh random inputs of an op (gates in (0.05, 0.95)) and upstream gradients for its outputs."""
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, seq_len, HEADS, HEAD_DIM)
    inputs = [_random(shape, generator) for _ in range(3)]
    if name == "rat":
        inputs.append(0.05 + 0.9 * torch.rand(*shape, generator=generator, dtype=torch.float64))
    upstream = [_random(shape, generator)]
    if name in ("attention", "rat"):
        upstream.append(_random((BATCH, HEADS, seq_len), generator))  # lse
    return inputs, upstream


OP_CASES = {  # name -> (op kind, keyword arguments)
    "dense": ("attention", {}),
    "window": ("attention", {"window": 7}),
    "s2": ("attention", {"s2": S2}),
    "rat": ("rat", {"chunk_size": CHUNK}),
    "rat L=16": ("rat", {"chunk_size": 16}),
    "lightning": ("linear_attention", {"decay": DECAY}),
}


def kernel_op(kind: str, options: dict, segment_ids: Tensor | None = None) -> Callable[..., tuple[Tensor, ...]]:
    segments = {} if segment_ids is None else {"segment_ids": segment_ids}
    if kind == "attention":
        return lambda q, k, v: kernels.attention(q, k, v, return_lse=True, **options, **segments)
    if kind == "rat":
        return lambda q, k, v, g: kernels.rat(q, k, v, g, return_lse=True, **options, **segments)
    return lambda q, k, v: kernels.linear_attention(q, k, v, **options, **segments)


# --------------------------------------------------------------------------- #
# One device: the torch kernels
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len", [61, 300])  # 300: several query blocks, recomputed in backward
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_keeps_each_document_alone(case: str, seq_len: int):
    kind, options = OP_CASES[case]
    segment_ids = packed_segment_ids(seq_len, seed=seq_len)
    inputs, upstream = op_inputs(kind, seq_len, seed=seq_len + 1)
    want_out, want_grads = each_alone(kernel_op(kind, options), inputs, upstream, segment_ids)
    got_out, got_grads = packed(kernel_op(kind, options, segment_ids), inputs, upstream)
    for name, got, want in zip(["out", "lse"], got_out, want_out):
        assert _rel_err(got, want) <= TOLERANCE, f"{case} {name}"
    for name, got, want in zip("qkvg", got_grads, want_grads):
        assert _rel_err(got, want) <= TOLERANCE, f"{case} d{name}"


@pytest.mark.parametrize(
    "case, masked", [("dense", False), ("window", False), ("s2", False), ("dense", True), ("window", True)]
)
def test_attention_without_lse_agrees(case: str, masked: bool):
    """Keys that are the queries' tokens run document by document; keys given with ids of their
    own (as ring attention's blocks are; S2 refuses them) run through the masked reference."""
    _, options = OP_CASES[case]
    segment_ids = packed_segment_ids(300, seed=5)
    inputs, upstream = op_inputs("attention", 300, seed=6)
    key_ids = {"k_segment_ids": segment_ids.clone()} if masked else {}
    op = lambda segments: (lambda q, k, v: kernels.attention(q, k, v, **options, **segments))  # noqa: E731
    want_out, want_grads = each_alone(op({}), inputs, upstream[:1], segment_ids)
    got_out, got_grads = packed(op({"segment_ids": segment_ids, **key_ids}), inputs, upstream[:1])
    assert _rel_err(got_out[0], want_out[0]) <= TOLERANCE
    for got, want in zip(got_grads, want_grads):
        assert _rel_err(got, want) <= TOLERANCE


def test_naive_references_keep_each_document_alone():
    segment_ids = packed_segment_ids(45, seed=9)
    (q, k, v, g), _ = op_inputs("rat", 45, seed=10)
    alone, _ = each_alone(lambda *x: rat_naive(*x, chunk_size=CHUNK), [q, k, v, g], [torch.ones_like(q)], segment_ids)
    assert _rel_err(rat_naive(q, k, v, g, chunk_size=CHUNK, segment_ids=segment_ids), alone[0]) <= TOLERANCE
    out, state = linear_attention_naive(q, k, v, decay=DECAY, segment_ids=segment_ids)
    alone, _ = each_alone(lambda *x: linear_attention_naive(*x, decay=DECAY)[0], [q, k, v], [torch.ones_like(q)],
                          segment_ids)
    assert _rel_err(out, alone[0]) <= TOLERANCE
    # The final state is the last document's: the rows' last documents alone.
    last = segment_ids == segment_ids[:, -1:]
    for row in range(BATCH):
        span = last[row].nonzero()[0, 0].item()
        _, want = linear_attention_naive(q[row : row + 1, span:], k[row : row + 1, span:], v[row : row + 1, span:],
                                         decay=DECAY)
        assert _rel_err(state[row : row + 1], want) <= TOLERANCE


def test_linear_attention_initial_state_belongs_to_the_first_document():
    segment_ids = packed_segment_ids(70, seed=11)
    (q, k, v), _ = op_inputs("linear_attention", 70, seed=12)
    initial = torch.randn(BATCH, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64)
    out = kernels.linear_attention(q, k, v, decay=DECAY, initial_state=initial, segment_ids=segment_ids)
    first = (segment_ids[0] == 0).sum().item()
    want = kernels.linear_attention(q[:1, :first], k[:1, :first], v[:1, :first], decay=DECAY, initial_state=initial[:1])
    assert _rel_err(out[:1, :first], want) <= TOLERANCE
    rest = kernels.linear_attention(q[:1, first:], k[:1, first:], v[:1, first:], decay=DECAY,
                                    segment_ids=segment_ids[:1, first:])
    assert _rel_err(out[:1, first:], rest) <= TOLERANCE


def test_one_document_is_plain_packing():
    segment_ids = torch.zeros(BATCH, 90, dtype=torch.long)
    for case, (kind, options) in OP_CASES.items():
        inputs, upstream = op_inputs(kind, 90, seed=13)
        want, _ = packed(kernel_op(kind, options), inputs, upstream)
        got, _ = packed(kernel_op(kind, options, segment_ids), inputs, upstream)
        assert _rel_err(got[0], want[0]) <= TOLERANCE, case


def test_positions_in_document():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2], [3, 3, 3, 3, 3, 3]])
    assert positions_in_document(ids).tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert positions_in_document(ids, torch.tensor([5, 2])).tolist() == [[5, 6, 7, 0, 0, 1], [2, 3, 4, 5, 6, 7]]


def test_bad_segment_ids_get_one_line_errors(monkeypatch):
    q = torch.randn(1, 8, HEADS, HEAD_DIM)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention: segment_ids of shape \(1, 7\) does not match the sequence"):
        kernels.attention(q, q, q, segment_ids=ids[:, :7])
    with pytest.raises(ValueError, match="must be an integer tensor"):
        kernels.rat(q, q, q, torch.rand_like(q), chunk_size=4, segment_ids=ids.float())
    with pytest.raises(ValueError, match="pass their k_segment_ids"):
        kernels.attention(q, q[:, :4], q[:, :4], causal=False, segment_ids=ids)
    with pytest.raises(ValueError, match="S2 with segment ids needs the keys to be the queries' tokens"):
        kernels.attention(q.repeat(1, 2, 1, 1), q.repeat(1, 2, 1, 1), q.repeat(1, 2, 1, 1), s2=S2,
                          segment_ids=ids.repeat(1, 2), k_segment_ids=ids.repeat(1, 2))
    with pytest.raises(ValueError, match="not prefix_k/prefix_v/chunk_start"):
        kernels.rat(q, q, q, torch.rand_like(q), chunk_size=4, segment_ids=ids, chunk_start=2)
    monkeypatch.setenv("LSYS_DEBUG", "1")
    with pytest.raises(ValueError, match="must be non-decreasing"):
        kernels.linear_attention(q, q, q, decay=DECAY.float(), segment_ids=torch.tensor([[0, 1, 1, 0, 2, 2, 2, 2]]))


# --------------------------------------------------------------------------- #
# The model: packed windows give each document's own logits and gradients
# --------------------------------------------------------------------------- #
MODEL = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=HEADS, ffn_dim=64, max_seq_len=512)
MODEL_LAYERS = {
    "hybrid": (["rat", "local", "lightning", "attention"], {"rat": {"chunk_size": CHUNK}, "local": {"window": 6}}),
    "s2": (["s2"], {"s2": {"block_size": 16, "local_blocks": 1, "vert_stride": 4}}),
}


def _model(name: str) -> LM:
    layers, options = MODEL_LAYERS[name]
    torch.manual_seed(0)
    return LM(ModelConfig(name=name, layers=layers, mixer_options=options, **MODEL)).double()


@pytest.mark.parametrize("name", list(MODEL_LAYERS))
def test_model_packed_windows_equal_each_document_alone(name: str):
    model = _model(name)
    segment_ids = packed_segment_ids(72, seed=21)
    tokens = torch.randint(0, 64, (BATCH, 72), generator=torch.Generator().manual_seed(22))
    upstream = torch.randn(BATCH, 72, 64, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    weights = list(model.parameters())
    logits = model(tokens, segment_ids=segment_ids)
    got_grads = torch.autograd.grad(logits, weights, upstream)
    want_grads = [torch.zeros_like(w) for w in weights]
    for row in range(BATCH):
        _, lengths = torch.unique_consecutive(segment_ids[row], return_counts=True)
        start = 0
        for length in lengths.tolist():
            alone = model(tokens[row : row + 1, start : start + length])
            assert _rel_err(logits[row : row + 1, start : start + length], alone) <= TOLERANCE, (row, start)
            grads = torch.autograd.grad(alone, weights, upstream[row : row + 1, start : start + length])
            for total, grad in zip(want_grads, grads):
                total += grad
            start += length
    for index, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert _rel_err(got, want) <= 1e-9, index


def test_positions_restart_only_with_restart_positions():
    segment_ids = packed_segment_ids(40, seed=24)
    restarted = parallel.documents(segment_ids)
    kept = parallel.documents(segment_ids, restart_positions=False)
    assert torch.equal(parallel.local_positions(40, torch.device("cpu"), restarted), positions_in_document(segment_ids))
    assert torch.equal(parallel.local_positions(40, torch.device("cpu"), kept), torch.arange(40))
    # RoPE scores depend on distances only, and a query sees only its own document: either way
    # the model computes the same, up to rounding.
    model = _model("hybrid")
    tokens = torch.randint(0, 64, (BATCH, 40))
    assert _rel_err(model(tokens, segment_ids=segment_ids, restart_positions=False),
                    model(tokens, segment_ids=segment_ids)) <= TOLERANCE


def test_model_refuses_segment_ids_that_do_not_match():
    model = _model("hybrid").float()
    with pytest.raises(ValueError, match=r"segment_ids of shape \(2, 9\) do not match the tokens' \(2, 10\)"):
        model(torch.zeros(2, 10, dtype=torch.long), segment_ids=torch.zeros(2, 9, dtype=torch.long))


# --------------------------------------------------------------------------- #
# Sequence parallelism: ring, Ulysses, hybrid, RAT-SP, LASP at 2 and 4 ranks, both layouts
# --------------------------------------------------------------------------- #
SP_OPS = {  # name -> (op kind, options, sp modes it runs under)
    "dense": ("attention", {}, ("ring", "ulysses", "hybrid")),
    "window": ("attention", {"window": 7}, ("ring", "ulysses", "hybrid")),
    "s2": ("attention", {"s2": S2}, ("ring",)),  # always Ulysses, whatever the mode
    "rat": ("rat", {"chunk_size": CHUNK}, ("ring",)),
    "lightning": ("linear_attention", {"decay": DECAY}, ("ring",)),
}


def parallel_op(kind: str, options: dict, documents: parallel.Documents) -> Callable[..., Tensor]:
    if kind == "attention":
        return lambda q, k, v: parallel.attention(q, k, v, documents=documents, **options)
    if kind == "rat":
        return lambda q, k, v, g: parallel.rat(q, k, v, g, rope_base=10000.0, documents=documents, **options)
    return lambda q, k, v: parallel.linear_attention(q, k, v, documents=documents, **options)


def _sp_cases(rank: int, world: int) -> None:
    seq_len = 2 * world * CHUNK * 3  # zigzag pieces of 3 chunks: documents straddle chunks and ranks
    modes = ("ring", "ulysses", "hybrid") if world == 4 else ("ring", "ulysses")
    for layout in LAYOUTS:
        sequence = SequenceLayout(layout, world)
        for mode in modes:
            init_mesh(World(rank, world, 0, torch.device("cpu")), sp=world, sp_mode=mode,
                      ulysses=2 if mode == "hybrid" else None, layout=layout)
            for seed, (name, (kind, options, op_modes)) in enumerate(SP_OPS.items()):
                if mode not in op_modes:
                    continue
                segment_ids = packed_segment_ids(seq_len, seed=seed)
                inputs, upstream = op_inputs(kind, seq_len, seed=100 + seed)
                upstream = upstream[:1]  # the output only
                reference_op = kernel_op(kind, {"rope_base": 10000.0, **options} if kind == "rat" else options)
                want_out, want_grads = each_alone(lambda *x: reference_op(*x)[0] if kind != "linear_attention"
                                                  else reference_op(*x), inputs, upstream, segment_ids)
                documents = parallel.documents(sequence.shard(segment_ids, rank))
                local_inputs = [sequence.shard(x, rank) for x in inputs]
                got_out, got_grads = packed(parallel_op(kind, options, documents), local_inputs,
                                            [sequence.shard(upstream[0], rank)])
                case = f"rank {rank}/{world} {layout} {mode} {name}"
                assert _rel_err(got_out[0], sequence.shard(want_out[0], rank)) <= TOLERANCE, case
                for label, got, want in zip("qkvg", got_grads, want_grads):
                    assert _rel_err(got, sequence.shard(want, rank)) <= TOLERANCE, f"{case} d{label}"
        # The model end to end: this rank's logits are its tokens' of each document alone.
        model = _model("hybrid")
        segment_ids = packed_segment_ids(seq_len, seed=31)
        tokens = torch.randint(0, 64, (BATCH, seq_len), generator=torch.Generator().manual_seed(32))
        init_mesh(World(rank, world, 0, torch.device("cpu")), sp=world, sp_mode="ring", layout=layout)
        logits = model(sequence.shard(tokens, rank), segment_ids=sequence.shard(segment_ids, rank))
        init_mesh(World(rank, world, 0, torch.device("cpu")), sp=1)
        whole = model(tokens, segment_ids=segment_ids)
        assert _rel_err(logits, sequence.shard(whole, rank)) <= TOLERANCE, f"rank {rank}/{world} {layout} model"
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_ops_keep_each_document_alone(world: int):
    run_local_ranks(_sp_cases, world)
