"""Cached decoding equals the full forward pass for every mixer; sampling; generation end to end."""

import subprocess
import sys

import pytest
import torch

from lsys.generate import Sampling, generate, next_tokens
from lsys.models import ModelConfig, build_model
from tests.conftest import REPO

OPTIONS = {
    "rat": {"chunk_size": 4, "qk_groups": 2},
    "local": {"window": 6},
    "s2": {"block_size": 16, "local_blocks": 2, "vert_stride": 2},
}
PATTERNS = [["attention"], ["rat"], ["local"], ["s2"], ["lightning"], ["rat", "local"], ["s2", "attention"]]


def tiny_model(layers: list[str], n_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=61, d_model=32, n_layers=n_layers, n_heads=4, ffn_dim=64, layers=layers,
        mixer_options={name: OPTIONS[name] for name in set(layers) if name in OPTIONS},
    )
    return build_model(cfg).double().eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("layers", PATTERNS, ids=["+".join(p) for p in PATTERNS])
@pytest.mark.parametrize("prompt_len", [1, 13, 37])
def test_decoding_matches_the_full_forward(layers: list[str], prompt_len: int):
    """Prefill a prompt, then feed the rest token by token: every logit equals one full forward (float64, 1e-10)."""
    model = tiny_model(layers)
    tokens = torch.randint(0, 61, (2, 70))
    with torch.no_grad():
        expected = model(tokens)
        caches = model.init_caches(2, tokens.shape[1])
        got = [model.prefill(tokens[:, :prompt_len], caches)]
        for t in range(prompt_len, tokens.shape[1]):
            got.append(model.decode(tokens[:, t : t + 1], caches))
    assert relative_error(torch.cat(got, dim=1), expected) < 1e-10


@pytest.mark.parametrize("layers", PATTERNS, ids=["+".join(p) for p in PATTERNS])
def test_batched_decoding_with_prompts_of_different_lengths(layers: list[str]):
    """Rows prefilled at lengths 5 and 22 then decoded together equal each sequence's own forward pass."""
    model = tiny_model(layers)
    sequences = [torch.randint(0, 61, (1, 50)), torch.randint(0, 61, (1, 50))]
    prompt_lens = [5, 22]
    steps = 50 - max(prompt_lens)
    with torch.no_grad():
        caches = model.init_caches(2, 50)
        for row, (sequence, length) in enumerate(zip(sequences, prompt_lens)):
            model.prefill(sequence[:, :length], [cache.row(row) for cache in caches])
        decoded = []
        for step in range(steps):
            tokens = torch.cat([seq[:, length + step] for seq, length in zip(sequences, prompt_lens)])
            decoded.append(model.decode(tokens[:, None], caches))
        decoded = torch.cat(decoded, dim=1)
        for row, (sequence, length) in enumerate(zip(sequences, prompt_lens)):
            expected = model(sequence)[0, length : length + steps]
            assert relative_error(decoded[row], expected) < 1e-10


def cache_bytes(layers: list[str], context: int) -> int:
    cfg = ModelConfig(
        vocab_size=256, d_model=2048, n_layers=1, n_heads=16, ffn_dim=64, layers=layers,
        mixer_options={"rat": {"chunk_size": 16}, "local": {"window": 1024},
                       "s2": {"block_size": 64, "local_blocks": 16, "vert_stride": 8}},
    )
    cfg.mixer_options = {k: v for k, v in cfg.mixer_options.items() if k in layers}
    model = build_model(cfg, device="meta").to(torch.bfloat16)
    return model.init_caches(1, context)[0].nbytes()


def test_cache_sizes_at_4k():
    sizes = {name: cache_bytes([name], 4096) for name in ["attention", "rat", "local", "s2", "lightning"]}
    print("cache bytes per layer at 4K context, bf16, 16 heads of 128:", sizes)
    # keys and values for every token vs summaries for every chunk of 16 plus one running state
    assert sizes["attention"] == 2 * 4096 * 2048 * 2
    assert 15 < sizes["attention"] / sizes["rat"] <= 16
    assert sizes["local"] == 2 * 1024 * 2048 * 2
    assert sizes["s2"] < sizes["attention"] / 2
    assert sizes["lightning"] == 16 * 128 * 128 * 4


def test_greedy_sampling_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    assert next_tokens(logits, Sampling()).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(logits, Sampling(temperature=1.0, top_k=2), generator) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    # top_p=0.5 keeps only the most likely token of row 0 (p ~ 0.64) but both top tokens of row 1 (0.52 + 0.47).
    draws = torch.stack([next_tokens(logits, Sampling(temperature=1.0, top_p=0.6), generator) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1} and set(draws[:, 1].tolist()) == {0, 3}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_generate_stops_at_eos_and_is_reproducible():
    model = tiny_model(["rat"])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    greedy = generate(model, prompts, max_new_tokens=12)
    assert [len(out) for out in greedy] == [12, 12]
    eos = greedy[0][3]
    stopped = generate(model, prompts, max_new_tokens=12, eos_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    sampling = Sampling(temperature=1.0, top_k=10)
    first = generate(model, prompts, max_new_tokens=8, sampling=sampling, generator=torch.Generator().manual_seed(3))
    again = generate(model, prompts, max_new_tokens=8, sampling=sampling, generator=torch.Generator().manual_seed(3))
    assert first == again


def run_generate(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch/generate.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_launch_generate_continues_prompts_of_a_trained_run(trained_run, tmp_path):
    result = run_generate(
        [f"ckpt={trained_run}", 'prompts=["def main(","import "]', "max_new_tokens=24", "temperature=0"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "--- 'def main('\ndef main(" in result.stdout and "--- 'import '\nimport " in result.stdout
    assert "step-00000002" in result.stderr  # it loaded the newest checkpoint of the run directory


def test_launch_generate_refuses_a_missing_checkpoint(tmp_path):
    result = run_generate([f"ckpt={tmp_path / 'nowhere'}"], tmp_path)
    assert result.returncode == 2
    assert f"checkpoint {tmp_path / 'nowhere'} does not exist" in result.stderr
