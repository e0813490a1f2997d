"""The peak memory of one training step on CPU, measured in a process of its own (launch/bench.py activations).

    python benchmarks/step_memory.py '{"model": {...}, "activations": {...}, "seq_len": 8192, "micro_batch": 1}'

prints one JSON line: {"step_peak": bytes, "baseline": bytes}. How: build the model, run one
forward+backward (warm-up: one-time allocations of torch and its thread pools), drop the
gradients, reset the kernel's high-water mark of this process's resident memory
(/proc/self/clear_refs), read the resident memory (the baseline: weights, libraries), run a
second step and read the high-water mark (VmHWM). The step peak is the difference: activations,
temporaries and gradients. Run it with MALLOC_MMAP_THRESHOLD_=65536 (measure_in_fresh_process does), so
that glibc maps every tensor of 64 KiB or more on its own and unmaps it when freed; otherwise
freed blocks stay in its heap and resident memory counts them after they are dead. Linux only.
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lsys.models import ActivationPlan, ModelConfig, build_model

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(model: ModelConfig, activations: ActivationPlan, *, seq_len: int, micro_batch: int) -> dict[str, int]:
    """In this process: the step peak and the baseline it stands on, in bytes."""
    torch.manual_seed(0)
    lm = build_model(model, activations=activations)
    tokens = torch.randint(0, model.vocab_size, (micro_batch, seq_len + 1))

    def step() -> None:
        lm(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        lm.zero_grad(set_to_none=True)

    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    baseline = _status_bytes("VmRSS")
    step()
    return {"step_peak": _status_bytes("VmHWM") - baseline, "baseline": baseline}


def measure_in_fresh_process(model: ModelConfig, activations: ActivationPlan, *, seq_len: int, micro_batch: int,
                             timeout: float = 1800) -> dict[str, int]:
    """`measure` in a new Python process, so that nothing of an earlier point is resident."""
    spec = {"model": model.__dict__, "activations": activations.__dict__, "seq_len": seq_len, "micro_batch": micro_batch}
    # Run by path: benchmarks/ belongs to the checkout, not to the installed packages.
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], env={**os.environ, **ENV},
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"step memory measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = measure(ModelConfig(**spec["model"]), ActivationPlan(**spec["activations"]),
                     seq_len=spec["seq_len"], micro_batch=spec["micro_batch"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
