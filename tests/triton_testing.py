"""What every Triton-backend test shares: the device, the dtypes with their tolerances, poisoning.

On a machine without CUDA the kernels run in the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1) in fp32 and fp16; bf16 runs only on a GPU,
where the same tests run compiled. Each test compares the kernel, run on inputs of the
tested dtype, against the torch reference run in float64 on the same values.
"""

import pytest
import torch

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton runs need a CUDA device")

# (atol, rtol) against the float64 reference. fp32 is limited by tl.dot (TF32 is off, so
# this is fp32 rounding through a few accumulations); fp16/bf16 by the rounding of the
# inputs' products and of the output itself.
TOLERANCES = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=[gpu, needs_gpu]),
]


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN-fill every kernel output before the kernel runs, on GPU as in the interpreter."""
    monkeypatch.setenv("LSYS_DEBUG", "1")


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """`got` (any dtype) equals the float64 `want` within the dtype's tolerance; `scale` widens it."""
    atol, rtol = TOLERANCES[dtype]
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    torch.testing.assert_close(
        got.double(), want.double(), atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{name} ({dtype}): {m}"
    )
