"""The kernel benchmark's own parts: the RAT reference path it races equals kernels.rat, its work counts
are right, and the whole harness runs end to end (on CPU in the Triton interpreter, timing nothing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_bench
from kernels import S2Pattern
from kernels.rat.naive import rat_naive
from tests.conftest import REPO


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_the_scan_flex_merge_reference_path_is_kernels_rat(chunk_size: int):
    generator = torch.Generator().manual_seed(chunk_size)
    shape = (2, 4 * chunk_size, 3, 16)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    g = torch.sigmoid(torch.randn(shape, generator=generator, dtype=torch.float64))
    got = kernel_bench.rat_flex_reference(q, k, v, g, chunk_size=chunk_size, compiled=False)
    torch.testing.assert_close(got, rat_naive(q, k, v, g, chunk_size=chunk_size), atol=1e-10, rtol=1e-10)


def test_work_counts():
    assert kernel_bench.causal_pairs(4) == 10
    # Chunk 2, T = 6: queries see 0, 0, 1, 1, 2, 2 summaries, plus their own state.
    assert kernel_bench.rat_pairs(6, 2) == 6 + 6
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=1, num_heads=2)  # every block visible
    assert kernel_bench.s2_pairs(64, pattern) == pytest.approx(pattern.kept_fraction(64) * 64 * 65 / 2)
    shape = kernel_bench.Shape(batch=2, seq_len=8, heads=3, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    forward, backward = kernel_bench.attention_flops(10, shape)
    assert forward == 4 * 2 * 3 * 4 * 10 and backward == 2.5 * forward


@pytest.mark.slow
def test_bench_kernels_runs_end_to_end_in_the_interpreter(tmp_path: Path):
    out = tmp_path / "perf.md"
    command = [
        sys.executable, str(REPO / "launch/bench.py"), "kernels", "--device", "cpu", "--allow-cpu",
        "--lengths", "64", "--tokens", "64", "--heads", "2", "--head-dim", "32", "--dtype", "fp32",
        "--repeats", "1", "--out", str(out),
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "## Kernels: Triton against SDPA, flex_attention and the torch references" in text
    for op, contestant in [("attention", "torch SDPA (flash)"), ("s2", "lsys triton dense"),
                           ("rat", "scan + flex_attention + merge"), ("linear_attention", "lsys triton")]:
        assert f"### {op}" in text and f"| {contestant} |" in text
    assert "error" not in text.lower()


def test_bench_kernels_refuses_a_cpu_without_asking(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch/bench.py"), "kernels", "--device", "cpu", "--out", str(tmp_path / "p.md")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "times Triton kernels on a CUDA device" in result.stderr
    assert not (tmp_path / "p.md").exists()
