"""`model.kernel_backend` reaches every op the model calls; the Triton kernels' one-time self-check; the config checks.

The backend tests run a tiny model of each mixer kind (forward, backward, on packed documents, and
generation) and each sequence-parallel op on one rank, and watch two things: every op call's
`backend` (a recorder on the ops' backend pick), which must be the configured one, never the
default "auto"; and Triton kernel launches (a counter on the launch method of interpreted and
compiled kernels alike). With kernel_backend="torch" none may run; with "triton" every phase but
decode (plain torch) launches some, which shows the counter works. On CPU "auto" would run torch
too, so there the recorder, not the counter, is what catches a call left at the default.

The self-check (kernels/self_check.py) runs on its own before an op's first CUDA launch; here
it is called directly on CPU, where the kernels run in the Triton interpreter, and its trigger
(`needs_self_check`) is replaced to show the public ops run it once, and never fall back.
"""

import importlib

import pytest
import torch
from omegaconf import OmegaConf
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels
import parallel
from kernels import self_check as self_check_module
from kernels.attention import attention_self_check
from kernels.linear_attention import linear_attention_self_check
from kernels.rat import chunk_summaries_self_check, rat_self_check
from kernels.self_check import TritonSelfCheckError, needs_self_check
from lsys.config import check_model, check_sequence_parallel, sequence_parallel_multiple
from lsys.models import ModelConfig, build_model
from parallel.layout import Piece
from tests.triton_testing import DEVICE

VOCAB, SEQ_LEN = 64, 32
# Options that keep every mixer on shapes its Triton kernels take (head dim 32) and give each a pattern to apply.
MIXER_OPTIONS = {
    "attention": {},
    "local": {"window": 8},
    "s2": {"block_size": 16, "local_blocks": 1, "vert_stride": 2},
    "rat": {"chunk_size": 8},
    "lightning": {},
}


@pytest.fixture
def triton_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Triton kernels launched during the test, compiled or interpreted, in order."""
    launches = []

    def counting(run):
        def counted_run(kernel, *args, **kwargs):
            launches.append(kernel.fn.__name__)
            return run(kernel, *args, **kwargs)

        return counted_run

    for kernel_class in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(kernel_class, "run", counting(kernel_class.run))
    return launches


@pytest.fixture
def op_backends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(op, backend asked for) of every kernels/ op call during the test, recorded where each op picks its backend."""
    calls = []

    def recording(pick):
        def recorded_pick(op: str, backend: str, *args, **kwargs) -> str:
            calls.append((op, backend))
            return pick(op, backend, *args, **kwargs)

        return recorded_pick

    for name in ("kernels.attention", "kernels.rat", "kernels.linear_attention"):
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "pick_backend", recording(module.pick_backend))
    return calls


def _tiny_model(mixer: str, kernel_backend: str):
    options = MIXER_OPTIONS[mixer]
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=2, ffn_dim=64, layers=[mixer],
        mixer_options={mixer: options} if options else {}, max_seq_len=SEQ_LEN + 1, kernel_backend=kernel_backend,
    )
    torch.manual_seed(0)
    return build_model(cfg, device=DEVICE)


@pytest.mark.parametrize("kernel_backend", ["torch", "triton"])
@pytest.mark.parametrize("mixer", list(MIXER_OPTIONS))
def test_kernel_backend_reaches_every_op_of_the_model(
    mixer: str, kernel_backend: str, triton_launches: list[str], op_backends: list[tuple[str, str]]
):
    model = _tiny_model(mixer, kernel_backend)
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    segment_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * SEQ_LEN], device=DEVICE)
    launches, seen = {}, 0

    def record(phase: str) -> None:
        """Count the launches since the last phase as `phase`'s."""
        nonlocal seen
        launches[phase], seen = len(triton_launches) - seen, len(triton_launches)

    loss = model(tokens, targets=tokens)
    record("forward")
    loss.backward()
    record("backward")
    loss = model(tokens, targets=tokens, segment_ids=segment_ids)
    record("forward, packed documents")
    loss.backward()
    record("backward, packed documents")
    caches = model.init_caches(1, SEQ_LEN + 1)
    with torch.no_grad():
        model.prefill(tokens[:1], caches)
        record("prefill")
        model.decode(tokens[:1, :1], caches)
        record("decode")

    assert op_backends and {backend for _, backend in op_backends} == {kernel_backend}, op_backends
    if kernel_backend == "torch":
        assert sum(launches.values()) == 0, f"Triton kernels ran: {launches}; {sorted(set(triton_launches))}"
    else:
        assert launches.pop("decode") == 0, "decoding one token is plain torch"
        assert all(launches.values()), f"some phase ran no Triton kernel: {launches}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_reaches_every_call_of_the_sequence_parallel_ops(
    backend: str, triton_launches: list[str], op_backends: list[tuple[str, str]]
):
    """On one rank (no process group), forward and backward; ring attention over two pieces out of order runs
    its own forward and backward, calling kernels.attention per (query piece, key piece) pair."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, SEQ_LEN, 2, 32, generator=generator).to(DEVICE) for _ in range(3))
    g = torch.sigmoid(torch.randn(q.shape, generator=generator)).to(DEVICE)
    decay = torch.tensor([0.9, 0.99], device=DEVICE)
    ops = {
        "parallel.attention": lambda q, k, v: parallel.attention(q, k, v, window=8, backend=backend),
        "ring_attention": lambda q, k, v: parallel.ring_attention(q, k, v, None, backend=backend),
        "ring_attention_pieces": lambda q, k, v: parallel.ring_attention_pieces(
            q, k, v, None, [[Piece(16, 16), Piece(0, 16)]], backend=backend
        ),
        "hybrid_attention": lambda q, k, v: parallel.hybrid_attention(q, k, v, None, None, backend=backend),
        "parallel.rat": lambda q, k, v: parallel.rat(q, k, v, g, chunk_size=8, rope_base=1e4, backend=backend),
        "rat_sp": lambda q, k, v: parallel.rat_sp(q, k, v, g, None, chunk_size=8, backend=backend),
        "parallel.linear_attention": lambda q, k, v: parallel.linear_attention(q, k, v, decay=decay, backend=backend),
        "lasp": lambda q, k, v: parallel.lasp(q, k, v, None, decay=decay, backend=backend),
    }
    launches = {}
    for name, op in ops.items():
        before = len(triton_launches)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        op(*inputs).square().sum().backward()
        launches[name] = len(triton_launches) - before
    assert {asked for _, asked in op_backends} == {backend}, op_backends
    if backend == "torch":
        assert sum(launches.values()) == 0, f"Triton kernels ran: {launches}"
    else:
        assert all(launches.values()), f"some op ran no Triton kernel: {launches}"


# --------------------------------------------------------------------------------------------- #
# The self-check
# --------------------------------------------------------------------------------------------- #
# op: (its self-check, the module of its Triton entry point, that entry point)
SELF_CHECKS = {
    "attention": (attention_self_check, "kernels.attention.triton", "attention_triton"),
    "rat": (rat_self_check, "kernels.rat.triton", "rat_triton"),
    "chunk_summaries": (chunk_summaries_self_check, "kernels.rat.triton", "chunk_summaries_triton"),
    "linear_attention": (linear_attention_self_check, "kernels.linear_attention.triton", "linear_attention_triton"),
}


@pytest.fixture
def passed_checks(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """An empty record of passed self-checks for this test, so that every check runs again (restored after)."""
    record = set()
    monkeypatch.setattr(self_check_module, "PASSED", record)
    return record


def _replace_entry(monkeypatch: pytest.MonkeyPatch, op: str, make_entry) -> None:
    """Swap op's Triton entry point for `make_entry(the real one)`."""
    _, module_name, entry_name = SELF_CHECKS[op]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, entry_name, make_entry(getattr(module, entry_name)))


@pytest.mark.parametrize("op", list(SELF_CHECKS))
def test_the_kernels_pass_their_self_check(op: str, passed_checks: set, triton_launches: list[str]):
    """Also under inference mode, as a first call from generation would come."""
    self_check = SELF_CHECKS[op][0]
    with torch.inference_mode():
        self_check(DEVICE)
    assert triton_launches, "the check launched no kernel"
    assert passed_checks == {(op, DEVICE.type)}


@pytest.mark.parametrize("op", list(SELF_CHECKS))
def test_a_wrong_kernel_fails_its_self_check(op: str, passed_checks: set, monkeypatch: pytest.MonkeyPatch):
    def off_by_one(entry):
        def broken(*args, **kwargs):
            first, *rest = entry(*args, **kwargs)
            return first + 1, *rest

        return broken

    _replace_entry(monkeypatch, op, off_by_one)
    with pytest.raises(TritonSelfCheckError) as failure:
        SELF_CHECKS[op][0](DEVICE)
    message = str(failure.value)
    assert message.startswith(f"{op}: the Triton kernel failed its self-check on {DEVICE.type}")
    assert "max error" in message and "vs tolerance" in message
    assert "set model.kernel_backend=torch" in message
    assert not passed_checks


def _compile_error(entry):
    """An entry point that fails as a kernel that does not compile would."""
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    return broken


def test_a_kernel_that_raises_fails_its_self_check(passed_checks: set, monkeypatch: pytest.MonkeyPatch):
    _replace_entry(monkeypatch, "rat", _compile_error)
    with pytest.raises(TritonSelfCheckError, match=r"^rat: .*RuntimeError: PassManager::run failed; set model\."
                                                   r"kernel_backend=torch"):
        rat_self_check(DEVICE)
    assert not passed_checks


def test_the_self_check_runs_once_per_op(passed_checks: set, triton_launches: list[str]):
    assert needs_self_check(torch.device("cuda")) and not needs_self_check(torch.device("cpu"))
    attention_self_check(DEVICE)
    assert triton_launches
    launched = len(triton_launches)
    attention_self_check(DEVICE)
    attention_self_check(DEVICE, torch.float16, head_dim=64)  # once per op and device type, whatever the call
    assert len(triton_launches) == launched


def _rat_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 24, 2, 32, generator=generator).to(DEVICE) for _ in range(3))
    return dict(q=q, k=k, v=v, g=torch.sigmoid(torch.randn(q.shape, generator=generator)).to(DEVICE))


def test_the_public_op_checks_before_its_first_launch(passed_checks: set, monkeypatch: pytest.MonkeyPatch):
    """With the trigger on (as on CUDA), the first call runs the check, then the call; later calls only the call.

    The check calls the Triton entry point itself, not the public op, so it does not recurse.
    """
    monkeypatch.setattr(importlib.import_module("kernels.rat"), "needs_self_check", lambda device: True)
    entry_calls = []

    def counted(entry):
        def counted_entry(*args, **kwargs):
            entry_calls.append(kwargs["chunk_size"])
            return entry(*args, **kwargs)

        return counted_entry

    _replace_entry(monkeypatch, "rat", counted)
    inputs = _rat_inputs()
    kernels.rat(**inputs, chunk_size=8, backend="triton")
    assert len(entry_calls) == 2 and passed_checks == {("rat", DEVICE.type)}
    kernels.rat(**inputs, chunk_size=8, backend="triton")
    assert len(entry_calls) == 3


def test_a_failed_check_stops_every_call(passed_checks: set, monkeypatch: pytest.MonkeyPatch):
    """Never a silent fall back to torch: each call raises again until the backend is changed."""
    monkeypatch.setattr(importlib.import_module("kernels.rat"), "needs_self_check", lambda device: True)
    _replace_entry(monkeypatch, "rat", _compile_error)
    inputs = _rat_inputs()
    for _ in range(2):
        with pytest.raises(TritonSelfCheckError, match="rat: the Triton kernel failed its self-check"):
            kernels.rat(**inputs, chunk_size=8, backend="triton")
    kernels.rat(**inputs, chunk_size=8, backend="torch")


# --------------------------------------------------------------------------------------------- #
# Config: the backend's value, and the mixers' sequence multiples under sequence parallelism
# --------------------------------------------------------------------------------------------- #
def test_an_unknown_kernel_backend_is_a_config_problem():
    problems = check_model(ModelConfig(kernel_backend="cuda"), seq_len=64)
    assert problems == ["model.kernel_backend must be auto, torch or triton, got 'cuda'"]


def test_each_mixer_states_its_sequence_multiple():
    rat_and_local = ModelConfig(layers=["rat", "local"], mixer_options={"rat": {"chunk_size": 8}})
    assert sequence_parallel_multiple(rat_and_local, pieces=4) == 32
    assert sequence_parallel_multiple(ModelConfig(layers=["rat"]), pieces=2) == 32  # RAT's default chunk of 16
    assert sequence_parallel_multiple(ModelConfig(layers=["attention", "s2", "lightning"]), pieces=4) == 4
    parallel_settings = OmegaConf.create({"sp": 2, "sp_mode": "ring", "layout": "zigzag", "ulysses": None})
    assert check_sequence_parallel(rat_and_local, 96, parallel_settings) == []
    assert check_sequence_parallel(rat_and_local, 80, parallel_settings) == [
        "data.seq_len (80) must be divisible by 8 x 4 = 32: mixer 'rat' needs a multiple of 8 tokens "
        "in each of the 4 layout pieces"
    ]
