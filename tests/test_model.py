"""The decoder LM: shapes, causality end to end, any length, the mixer registry, RAT's gates and groups."""

import pytest
import torch
from torch import nn

from lsys.config import check_model
from lsys.models import MIXERS, ModelConfig, build_model, register_mixer
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


def test_head_is_tied_to_the_embedding():
    model = build_model(tiny(["rat"]))
    names = [name for name, _ in model.named_parameters()]
    assert not any("head" in name for name in names)
    tokens = torch.randint(0, 50, (1, 5))
    model(tokens).sum().backward()
    assert model.embed.weight.grad is not None


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


def test_flops_per_token_counts_weights_and_mixing():
    model = build_model(tiny(["attention"]))
    seq_len = 64
    mixing = 2 * 4 * 32 * (seq_len + 1) / 2
    assert model.flops_per_token(seq_len) == 6 * model.num_params() + 3 * mixing


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

    from lsys.train.checkpoint import file_sha256, load_model_weights

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
