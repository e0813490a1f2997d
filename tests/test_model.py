"""The decoder LM: shapes, causality end to end, any length, the mixer registry, RAT's gates and groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lsys.config import check_model
from lsys.models import MIXERS, ModelConfig, build_model, register_mixer
from lsys.models.lm import LM
from lsys.models.rat import RAT

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, mixer_options={})


def tiny(layers: list[str], **overrides) -> ModelConfig:
    options = {"rat": {"chunk_size": 4, "qk_groups": 2}} if "rat" in layers else {}
    return ModelConfig(**{**TINY, "layers": layers, "mixer_options": options, **overrides})


@pytest.mark.parametrize("layers", [["rat"], ["attention"], ["rat", "attention"]])
@pytest.mark.parametrize("seq_len", [16, 19, 3])
def test_lm_is_causal_at_any_length(layers: list[str], seq_len: int):
    torch.manual_seed(0)
    model = build_model(tiny(layers)).double()
    tokens = torch.randint(0, 50, (2, seq_len))
    logits = model(tokens)
    assert logits.shape == (2, seq_len, 50) and logits.dtype == torch.float64
    for t in sorted({0, seq_len // 2, seq_len - 2}):
        changed = tokens.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 50  # every later token differs
        other = model(changed)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        if t + 1 < seq_len:
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


class UntiedLM(LM):
    """The same LM with a head of its own, initialised as a copy of the embedding: what tying must not be."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head = nn.Parameter(self.embed.weight.detach().clone())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head).float()


def head_is_the_embedding(model: LM) -> bool:
    """Whether the head is the embedding matrix: the model holds one [vocab, d_model] matrix (so num_params
    counts it once), and a training step's gradient reaches the embedding rows of tokens that appear only as
    targets (only the head can carry it there: the input lookup touches the rows of input tokens alone)."""
    vocab, d_model = model.cfg.vocab_size, model.cfg.d_model
    one_matrix = [p.shape for p in model.parameters()].count((vocab, d_model)) == 1
    inputs = torch.randint(0, vocab // 2, (2, 8))
    targets = torch.randint(vocab // 2, vocab, (2, 8))
    model.zero_grad(set_to_none=True)
    model(inputs, targets=targets).backward()
    target_rows = model.embed.weight.grad[targets.unique()]
    return one_matrix and bool((target_rows != 0).any(dim=1).all())


def test_head_is_tied_to_the_embedding():
    torch.manual_seed(0)
    assert head_is_the_embedding(build_model(tiny(["rat"])))
    assert not head_is_the_embedding(UntiedLM(tiny(["rat"])))


def test_layer_pattern_repeats():
    model = build_model(tiny(["rat", "attention"], n_layers=4))
    kinds = [type(block.mixer).__name__ for block in model.blocks]
    assert kinds == ["RAT", "Attention", "RAT", "Attention"]


def test_registering_a_mixer_is_one_decorator():
    @register_mixer("identity_for_test")
    class Identity(nn.Module):
        def __init__(self, cfg: ModelConfig, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        @classmethod
        def check(cls, cfg, seq_len, scale: float = 1.0):
            return [] if scale > 0 else ["scale must be positive"]

        @classmethod
        def attention_flops_per_token(cls, cfg, seq_len, scale: float = 1.0):
            return 0.0

        def forward(self, x):
            return self.scale * x

    try:
        cfg = tiny(["identity_for_test"], mixer_options={"identity_for_test": {"scale": 0.5}})
        model = build_model(cfg)
        assert model(torch.randint(0, 50, (1, 6))).shape == (1, 6, 50)
        assert check_model(cfg, seq_len=8) == []
        bad = tiny(["identity_for_test"], mixer_options={"identity_for_test": {"scale": -1.0}})
        assert check_model(bad, seq_len=8) == ["scale must be positive"]
        with pytest.raises(ValueError, match="registered twice"):
            register_mixer("identity_for_test")(Identity)
    finally:
        del MIXERS["identity_for_test"]


def test_rat_gate_is_fp32_per_channel_and_groups_are_shared(monkeypatch):
    import kernels

    cfg = tiny(["rat"])
    rat = RAT(cfg, chunk_size=4, qk_groups=2)
    assert rat.in_proj.out_features == 3 * cfg.d_model + 2 * 2 * cfg.head_dim
    assert rat.gate_bias.shape == (cfg.d_model,)
    captured = {}

    def record_inputs(q, k, v, g, **kwargs):
        captured.update(q=q, k=k, g=g)
        return v

    monkeypatch.setattr(kernels, "rat", record_inputs)
    rat(torch.randn(2, 8, cfg.d_model))
    q, k, g = captured["q"], captured["k"], captured["g"]
    # Heads 0 and 2 read group 0, heads 1 and 3 group 1.
    assert torch.equal(q[:, :, 0], q[:, :, 2]) and torch.equal(k[:, :, 1], k[:, :, 3])
    assert not torch.equal(q[:, :, 0], q[:, :, 1])
    assert g.dtype == torch.float32 and ((g > 0) & (g < 1)).all()


def counted_matmul_flops(model: LM, seq_len: int) -> tuple[float, float]:
    """(weight, token-mixing) matmul FLOPs per token of one real training step (forward and backward), by
    torch's FlopCounterMode: aten.mm are the linear layers and the tied head, aten.bmm the mixers' scores and
    weighted sums. SDPA runs its math backend, whose matmuls the counter sees (it skips the fused CPU kernel)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, seq_len + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.bmm"}, counts  # no matmul of another kind goes uncompared
    return counts["aten.mm"] / tokens[:, 1:].numel(), counts.get("aten.bmm", 0) / tokens[:, 1:].numel()


def vector_params(model: LM) -> int:
    """Parameters outside matrices (norm weights, RAT's gate bias): 6N counts them, but they only scale or shift."""
    return sum(p.numel() for p in model.parameters() if p.dim() < 2)


# LM.flops_per_token against FlopCounterMode on a real step. The counter counts every matmul the torch backend
# runs; the formula counts the work the model needs. They differ, exactly and for known reasons only:
# - the backend computes scores the causal structure hides (SDPA's math path all T x T; RAT every summary for
#   every token), so only the visible fraction of the counted mixing FLOPs is compared, that fraction taken from
#   the mask of what a token sees;
# - the formula also counts elementwise work a matmul counter cannot see: 6 FLOPs per vector parameter (the 6N
#   convention), and for RAT, in forward and backward (x3) per layer, its own-state score and read (4 * d_model)
#   and the gated scan (12 * d_model, the formula's own estimate of that elementwise work);
# - RAT's torch backend turns queries and summaries by their chunk's RoPE angle as one matmul per chunk (x @ R,
#   and grad @ R^T in backward), which the counter sees as bmm; RoPE is not in the formula for any mixer.
# So the comparison is to float rounding (rel 1e-9), and an error of one visible key per token fails it.
# Lightning is not compared: its formula counts the recurrent form (4 * d_model * head_dim per token), while
# its torch backend runs the chunked form, whose matmul FLOPs depend on the block size.
@pytest.mark.parametrize("seq_len", [64, 128])
def test_flops_per_token_of_attention_matches_a_flop_counter(seq_len: int):
    model = build_model(tiny(["attention"]))
    weights, scores = counted_matmul_flops(model, seq_len)
    causal_fraction = torch.ones(seq_len, seq_len).tril().mean().item()  # a query sees itself and earlier keys
    counted = weights + causal_fraction * scores + 6 * vector_params(model)
    assert model.flops_per_token(seq_len) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("seq_len", [32, 64])
def test_flops_per_token_of_rat_matches_a_flop_counter(seq_len: int):
    model = build_model(tiny(["rat"]))
    cfg = model.cfg
    chunk_size = cfg.mixer_options["rat"]["chunk_size"]
    chunks = seq_len // chunk_size
    weights, mixing = counted_matmul_flops(model, seq_len)
    rotations = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim**2 * (1 + 1 / chunk_size)  # queries, summaries
    summary_scores = mixing - rotations
    # The kernel scores every token against the summaries of chunks 0 .. C-2; a token of chunk c sees the first c.
    seen_fraction = (torch.arange(chunks)[:, None] > torch.arange(chunks - 1)).float().mean().item()
    elementwise = 6 * vector_params(model) + 3 * model.cfg.n_layers * (4 + 12) * model.cfg.d_model
    counted = weights + seen_fraction * summary_scores + elementwise
    assert model.flops_per_token(seq_len) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_rat_gate_bias_starts_as_log_uniform_between_1_and_chunk_minus_1(chunk_size: int):
    # The RAT paper's init: b_g = log u, u ~ U(1, L - 1) per channel, so sigmoid(b_g) spans [0.5, 1 - 1/L].
    torch.manual_seed(0)
    cfg = tiny(["rat"], d_model=1024, n_heads=8)
    model = build_model(ModelConfig(**{**cfg.__dict__, "mixer_options": {"rat": {"chunk_size": chunk_size}}}))
    for block in model.blocks:
        drawn = block.mixer.gate_bias.detach().exp().double().sort().values  # the u of each channel
        assert drawn.min() >= 1.0 and drawn.max() <= chunk_size - 1.0
        # Kolmogorov-Smirnov distance to U(1, L - 1); 1.63 / sqrt(n) is its 1% critical value.
        uniform_cdf = (drawn - 1) / (chunk_size - 2)
        empirical_cdf = torch.arange(1, len(drawn) + 1, dtype=torch.float64) / len(drawn)
        assert (uniform_cdf - empirical_cdf).abs().max() < 1.63 / len(drawn) ** 0.5
    first, second = (block.mixer.gate_bias for block in model.blocks)
    assert not torch.equal(first, second)  # every layer draws its own


def test_rat_reset_parameters_redraws_the_gate_bias_and_small_chunks_start_at_half():
    cfg = tiny(["rat"])
    rat = RAT(cfg, chunk_size=16)
    with torch.no_grad():
        rat.gate_bias.zero_()
    build_model(cfg)  # other draws in between
    rat.reset_parameters()
    assert rat.gate_bias.std() > 0.3 and torch.sigmoid(rat.gate_bias).min() >= 0.5
    for chunk_size in (1, 2):  # U(1, L - 1) is empty or a point: the gates start at 0.5
        assert torch.equal(RAT(cfg, chunk_size=chunk_size).gate_bias, torch.zeros(cfg.d_model))


def test_checkpoints_from_before_the_gate_init_still_load(tmp_path):
    from safetensors.torch import save_file

    from lsys.checksums import file_sha256
    from lsys.train.checkpoint import load_model_weights

    cfg = tiny(["rat"])
    old = build_model(cfg)
    with torch.no_grad():
        for block in old.blocks:
            block.mixer.gate_bias.zero_()  # what every RAT layer started with before the paper's init
    save_file(old.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "COMPLETE").write_text('{"files": {"model.safetensors": {"sha256": "%s"}}}' % file_sha256(
        tmp_path / "model.safetensors"))
    new = build_model(cfg)
    new.load_state_dict(load_model_weights(tmp_path, new.state_dict()))
    tokens = torch.randint(0, 50, (2, 9))
    assert all(torch.equal(block.mixer.gate_bias, torch.zeros(cfg.d_model)) for block in new.blocks)
    torch.testing.assert_close(new(tokens), old(tokens), rtol=0, atol=0)
