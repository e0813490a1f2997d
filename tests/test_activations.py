"""Activation checkpointing, tiled loss and MLP, and offload: the same losses and gradients, less held for backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from lsys.config import check_config, device_problems
from lsys.models import ActivationPlan, ModelConfig, build_model
from lsys.models.tiling import tiled_cross_entropy, tiled_mlp
from parallel import World, init_mesh
from tests.conftest import compose_config
from tests.local_ranks import run_local_ranks

# One small model per mixer; S2's blocks are at least 16 tokens, so sequences are 64 long.
MIXER_OPTIONS = {
    "attention": {},
    "rat": {"rat": {"chunk_size": 4}},
    "local": {"local": {"window": 8}},
    "s2": {"s2": {"block_size": 16, "local_blocks": 1, "vert_stride": 2}},
    "lightning": {},
}
SEQ_LEN = 64
PLANS = {
    "full": ActivationPlan("full"),
    "mixer": ActivationPlan("mixer"),
    "every_n": ActivationPlan("every_n", every=2),
    "tiled loss": ActivationPlan(loss_chunk=7),
    "tiled MLP": ActivationPlan(mlp_chunk=5),
    "all with offload": ActivationPlan("full", loss_chunk=5, mlp_chunk=8, offload=True),
}


def model_config(mixer: str) -> ModelConfig:
    return ModelConfig(
        name=mixer, vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, layers=[mixer],
        mixer_options=MIXER_OPTIONS[mixer],
    )


def loss_and_grads(cfg: ModelConfig, plan: ActivationPlan, tokens: torch.Tensor, positions=slice(None)):
    """Loss and every weight's gradient of one float64 forward+backward (the same weights for every plan)."""
    torch.manual_seed(1)
    model = build_model(cfg, activations=plan).double()
    loss = model(tokens[:, :-1][:, positions], targets=tokens[:, 1:][:, positions])
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters()}


def assert_same(result, reference, rtol: float = 1e-10) -> None:
    (loss, grads), (ref_loss, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=rtol * grad.abs().max().item(), msg=name)


# float64 throughout: recomputation repeats the same ops, so only the tiled sums reorder (rtol 1e-10).
@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_every_plan_gives_the_plain_loss_and_gradients(mixer: str):
    cfg = model_config(mixer)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(3))
    reference = loss_and_grads(cfg, ActivationPlan(), tokens)
    for name, plan in PLANS.items():
        try:
            assert_same(loss_and_grads(cfg, plan, tokens), reference)
        except AssertionError as error:
            raise AssertionError(f"plan {name!r}: {error}") from None


def saved_bytes(cfg: ModelConfig, plan: ActivationPlan, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes of the tensors a forward keeps for backward, the largest of them), in fp32."""
    torch.manual_seed(1)
    model = build_model(cfg, activations=plan)
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return sum(storages.values()), max(storages.values())


def test_plans_keep_less_for_backward():
    """What each option is for: checkpointing keeps block inputs only, the tiled loss keeps no [T, vocab] logits."""
    cfg = ModelConfig(name="saved", vocab_size=2048, d_model=32, n_layers=4, n_heads=4, ffn_dim=128, layers=["rat"])
    tokens = torch.randint(0, cfg.vocab_size, (1, 1025), generator=torch.Generator().manual_seed(0))
    plain_total, plain_largest = saved_bytes(cfg, ActivationPlan(), tokens)
    logits_bytes = 1024 * cfg.vocab_size * 4
    assert plain_largest >= logits_bytes  # the plain head keeps [T, vocab] fp32 logits (or their log-softmax)
    _, tiled_largest = saved_bytes(cfg, ActivationPlan(loss_chunk=128), tokens)
    assert tiled_largest < logits_bytes / 4
    full_total, _ = saved_bytes(cfg, ActivationPlan("full", loss_chunk=128), tokens)
    block_input = 1024 * cfg.d_model * 4
    # Four block inputs, the final norm's input and output, the tiled loss's gradients and the embedding table.
    assert full_total <= 8 * block_input + 2 * cfg.vocab_size * cfg.d_model * 4, (full_total, plain_total)
    assert full_total < plain_total / 10


def test_tiled_cross_entropy_equals_the_plain_head():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[[3, 20, 21]] = -100  # ignored, as masked prompt tokens will be
    for chunk, reduction in itertools.product((1, 8, 37, 64), ("mean", "sum")):  # one row, a partial last slice,
        # exactly one slice, more than all
        expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction=reduction)
        expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
        loss = tiled_cross_entropy(hidden, weight, targets, chunk=chunk, reduction=reduction)
        grads = torch.autograd.grad(2.5 * loss, (hidden, weight))  # a scaled loss scales the gradients
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_tiled_cross_entropy_under_bf16_autocast_matches_the_plain_head():
    """Logits in bf16 under autocast as the plain head forms them: equal within bf16's resolution."""
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = (0.2 * torch.randn(80, 32, generator=generator)).requires_grad_()
    targets = torch.randint(0, 80, (64,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss = tiled_cross_entropy(hidden, weight, targets, chunk=24)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # the same bf16 logits, reduced in fp32
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())


def test_tiled_mlp_equals_the_whole_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(), torch.nn.Linear(24, 8)).double()
    x = torch.randn(3, 29, 8, dtype=torch.float64, requires_grad=True)
    expected = mlp(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, *mlp.parameters()))
    out = tiled_mlp(mlp, x, chunk=6)
    grads = torch.autograd.grad(out.square().sum(), (x, *mlp.parameters()))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


def test_offload_needs_a_cuda_device():
    cfg = compose_config(["trainer.activation_checkpointing=full", "trainer.offload_activations=true"])
    assert check_config(cfg) == []
    problems = device_problems(cfg, torch.device("cpu"))
    assert len(problems) == 1 and "needs a CUDA device" in problems[0]
    assert device_problems(cfg, torch.device("cuda", 0)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to pinned host memory needs a CUDA device")
def test_offload_moves_block_inputs_off_the_gpu():
    cfg = ModelConfig(name="offload", vocab_size=256, d_model=256, n_layers=8, n_heads=4, ffn_dim=1024, layers=["rat"])
    tokens = torch.randint(0, cfg.vocab_size, (1, 8193), device="cuda")
    peaks = {}
    for offload in (False, True):
        torch.manual_seed(1)
        model = build_model(cfg, "cuda", ActivationPlan("full", loss_chunk=1024, offload=offload))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        peaks[offload] = torch.cuda.memory_allocated() - start  # what forward leaves for backward
        loss.backward()
    block_input = 8192 * cfg.d_model * 4
    assert peaks[False] - peaks[True] >= (cfg.n_layers - 1) * block_input, peaks


def _sequence_parallel_worker(rank: int, world_size: int, mode: str) -> None:
    """At sp = world_size, each rank's loss and gradients under every plan equal its plain ones."""
    world = World(rank, world_size, 0, torch.device("cpu"))
    mesh = init_mesh(world, sp=world_size, sp_mode=mode, layout="zigzag")
    positions = mesh.layout.positions(mesh.sp_rank, SEQ_LEN)
    for mixer in sorted(MIXER_OPTIONS):
        cfg = model_config(mixer)
        tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(3))
        reference = loss_and_grads(cfg, ActivationPlan(), tokens, positions)
        for name, plan in PLANS.items():
            try:
                assert_same(loss_and_grads(cfg, plan, tokens, positions), reference)
            except AssertionError as error:
                raise AssertionError(f"{mixer}, plan {name!r}, rank {rank}: {error}") from None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_recomputed_sequence_parallel_blocks_give_the_plain_gradients(mode: str):
    """Recomputation repeats each block's collectives in backward, in the same order on every rank."""
    run_local_ranks(_sequence_parallel_worker, 2, mode)
