"""Which backend runs an op, and what every Triton backend checks before it launches anything.

`backend="auto"` runs Triton on CUDA tensors that the kernel supports and the torch
reference everywhere else; `backend="triton"` insists, and a tensor the kernel cannot
take is a ValueError that names it, raised before any launch. On CPU the Triton kernels
run only under the interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported), which is how the tests run them everywhere.
"""

import importlib.util
import os
import warnings
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors) instead of compiled."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_problem(tensors: Mapping[str, Tensor | None], *, head_dims: Collection[int]) -> str | None:
    """Why the Triton kernels cannot take these tensors (None when they can).

    Checks: triton is installed; all tensors share one device, CUDA (or CPU under the
    interpreter); each dtype is fp16, bf16 or fp32; each last dimension is contiguous
    (other strides are passed to the kernels); the head dim is one the kernels are built for.
    """
    if not triton_installed():
        return "triton is not installed (pip install triton)"
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) > 1:
        return f"tensors are on different devices: {', '.join(f'{n} on {d}' for n, d in devices.items())}"
    device = next(iter(devices.values()))
    if device.type == "cpu" and not interpreting():
        return "CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before importing kernels"
    if device.type not in ("cuda", "cpu"):
        return f"tensors are on {device}; the Triton kernels run on CUDA"
    for name, t in present.items():
        if t.dtype not in TRITON_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take {', '.join(map(str, TRITON_DTYPES))}"
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name} is not contiguous in its last dimension (strides {t.stride()}); call .contiguous()"
    dims = {t.shape[-1] for t in present.values() if t.dim() == 4}
    unsupported = sorted(dims - set(head_dims))
    if unsupported:
        return f"head dim {unsupported[0]} is not supported; the Triton kernels take {sorted(head_dims)}"
    return None


def pick_backend(
    op: str,
    backend: str,
    tensors: Mapping[str, Tensor | None],
    *,
    head_dims: Collection[int],
    op_problem: str | None = None,
) -> str:
    """"torch" or "triton" for this call; raises when "triton" was asked for and cannot run.

    `op_problem` is the op's own reason its kernels cannot take this call (a chunk size they
    are not built for, say), weighed like the shared checks of `triton_problem`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = next(t for t in tensors.values() if t is not None).device.type == "cuda"
    if backend == "auto" and not on_cuda:
        return "torch"
    problem = triton_problem(tensors, head_dims=head_dims) or op_problem
    if problem is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{op}: backend='triton' cannot run: {problem}")
    warnings.warn(f"{op}: using the torch reference on CUDA because {problem}", UserWarning, stacklevel=3)
    return "torch"


def poison_outputs() -> bool:
    """Whether kernel outputs start as NaN, so an element a kernel forgot to write shows up.

    On under the interpreter and with LSYS_DEBUG=1 (the tests); off otherwise, where the
    fill would be a wasted pass over memory.
    """
    return interpreting() or os.environ.get("LSYS_DEBUG") == "1"


def new_output(shape: tuple[int, ...], *, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output buffer every element of which a kernel must write: NaN-filled when poisoning."""
    dtype = like.dtype if dtype is None else dtype
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def pinned_configs(configs: list) -> list:
    """Autotune configs: all of them when compiled, only the first when interpreting (autotune needs a GPU)."""
    return configs[:1] if interpreting() else configs
