"""A one-time check of each op's Triton kernels against its torch reference, before their first compiled launch.

A compiled kernel can go wrong where the interpreter the tests run it in does not: a new GPU
architecture, another Triton or driver version, a compiler bug. So before an op's first launch
on a CUDA device, `self_check` runs its Triton path and its torch reference (in float64, on the
same inputs) forward and backward on a small fixed problem, in the call's dtype and head dim so
that the kernels checked are the ones compiled for the call, and raises `TritonSelfCheckError`,
naming the op and the way back to the torch reference, on a mismatch or on any exception. It
never falls back silently. A check that passed is recorded in `PASSED`, once per process, op
and device type; a failed one is not, so every later call raises again.

The ops decide when to check (`needs_self_check`: compiled launches, i.e. CUDA); the tests call
`self_check` directly on CPU, where the kernels run in the Triton interpreter.
"""

from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

# (op, device type) of every check that passed in this process: the one piece of global state the
# check needs, so that it runs once per process rather than once per call.
PASSED: set[tuple[str, str]] = set()

# Largest error allowed, relative to the reference's largest magnitude (see `_relative_error`): well
# above the kernels' rounding (in the interpreter about 1e-6 in fp32, 5e-4 in fp16), well below what a
# broken kernel gives (order 1, or NaN).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# (what is compared, the Triton path's result, the float64 torch reference's)
Comparison = tuple[str, Tensor, Tensor]


class TritonSelfCheckError(RuntimeError):
    """An op's Triton kernels disagreed with its torch reference, or failed to run, in their self-check."""


def needs_self_check(device: torch.device) -> bool:
    """Whether a Triton launch on `device` runs compiled code, which is checked before its first launch."""
    return device.type == "cuda"


def self_check(
    op: str, device: torch.device, dtype: torch.dtype, comparisons: Callable[[], list[Comparison]],
    kernels_module: ModuleType,
) -> None:
    """Run `comparisons` once per process, `op` and device type; raise TritonSelfCheckError on a mismatch or error.

    `comparisons` runs the op's Triton path and its torch reference on the op's small problem;
    `kernels_module` holds its kernels, whose autotuning picks on that problem are then dropped.
    """
    if (op, device.type) in PASSED:
        return
    tolerance = TOLERANCES[dtype]
    fix = "set model.kernel_backend=torch (backend='torch' in a direct call) to use the torch reference"
    failed = f"{op}: the Triton kernel failed its self-check on {_describe(device)}"
    # Whatever context the first call comes in (no_grad, inference_mode, autocast, activation
    # checkpointing's or offloading's saved-tensor hooks), the check runs plainly: gradients on, no
    # autocast, saved tensors kept as they are (identity hooks shadow any that are installed).
    with (
        torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor),
    ):
        try:
            results = comparisons()
        except Exception as error:
            raise TritonSelfCheckError(f"{failed}: {type(error).__name__}: {error}; {fix}") from error
    for what, got, want in results:
        if got.shape != want.shape:
            raise TritonSelfCheckError(
                f"{failed}: {what} has shape {tuple(got.shape)}, the reference's {tuple(want.shape)}; {fix}"
            )
        error = _relative_error(got, want)
        if not error <= tolerance:  # NaN fails too
            raise TritonSelfCheckError(
                f"{failed}: {what} max error {error:.3g} (relative to its largest value) vs tolerance "
                f"{tolerance:g} in {str(dtype).removeprefix('torch.')}; {fix}"
            )
    _forget_tuning(kernels_module)
    PASSED.add((op, device.type))


def random_inputs(shapes: dict[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """A standard-normal tensor of each name's shape, in order from one seed: the same in every process."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(device, dtype) for name, shape in shapes.items()}


def compare_with_reference(
    triton_fn: Callable[..., tuple[Tensor, ...]],
    reference_fn: Callable[..., tuple[Tensor, ...]],
    inputs: dict[str, Tensor],
    output_names: Sequence[str],
) -> list[Comparison]:
    """Outputs and input gradients of `triton_fn(**inputs)` against `reference_fn` on the same inputs in float64.

    Both return the outputs named by `output_names`; the gradients are those of one fixed random
    weighting of all of them, so every output's backward is exercised.
    """
    got = _outputs_and_grads(triton_fn, inputs, output_names)
    want = _outputs_and_grads(reference_fn, {name: x.double() for name, x in inputs.items()}, output_names)
    return [(name, got[name], want[name]) for name in want]


def _outputs_and_grads(
    fn: Callable[..., tuple[Tensor, ...]], inputs: dict[str, Tensor], output_names: Sequence[str]
) -> dict[str, Tensor]:
    """`fn`'s outputs by name, and the gradient "d<input>" of each input."""
    leaves = {name: x.detach().requires_grad_() for name, x in inputs.items()}
    outputs = fn(**leaves)
    generator = torch.Generator().manual_seed(1)  # the same weights for the Triton path and the reference
    loss = sum(
        (out.double() * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)).sum()
        for out in outputs
    )
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = dict(zip(output_names, (out.detach() for out in outputs), strict=True))
    return results | {f"d{name}": grad for name, grad in zip(leaves, grads)}


def _relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| over max |want|: one number for tensors whose scale differs (outputs, gradients)."""
    scale = want.abs().max().clamp(min=torch.finfo(want.dtype).tiny)
    return ((got.to(want.dtype) - want).abs().max() / scale).item()


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} (Triton interpreter)"


def _forget_tuning(kernels_module: ModuleType) -> None:
    """Drop the autotuners' picks: made on the check's tiny problem, they would stick to the op's real calls.

    The tuning key (head dim, mask flags, dtypes) leaves out the sequence length, so a pick
    made here would be reused at every length; cleared, the first real call tunes on its own
    shapes (the kernels stay compiled, so that costs only the timing runs).
    """
    from triton.runtime.autotuner import Autotuner  # here: triton is optional, and installed once a check ran

    for value in vars(kernels_module).values():
        if isinstance(value, Autotuner):
            value.cache.clear()
