"""Training metrics on rank 0: a log line, a JSONL record and optionally TensorBoard.

Throughput and MFU. `tokens/s` counts target tokens of the global batch per
second of wall time between two log lines (evaluation and checkpoint time excluded).
MFU = tokens/s per device * FLOPs per token / the device's peak dense bf16 FLOP/s,
where FLOPs per token = 6 * N (all weights, tied head included: forward 2N, backward 4N)
+ 3 * the mixers' token-mixing forward FLOPs (attention: 4 * d_model * (T+1)/2 per
layer when causal; RAT: 4 * d_model * (T/L + 1)/2 plus its scan), see `LM.flops_per_token`.
The peak is `trainer.peak_tflops` where set, else looked up by the exact device model
(`PEAK_BF16_FLOPS`); where it is unknown (CPUs, unlisted GPUs) MFU is left out, never guessed.
"""

import json
import logging
import os
import re
import resource
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device model, from the vendor data sheets (NVIDIA's; they print the figure
# "with sparsity", twice these). A model missing here gets no MFU rather than a neighbour's peak.
PEAK_BF16_FLOPS = {
    "H100 SXM": 989.4e12,  # H100 whitepaper: 989.4 (1,979 with sparsity)
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 SXM": 989.4e12,  # the H100 SXM's chip and clocks (data sheet: 1,979 with sparsity)
    "H200 NVL": 835e12,
    "GH200": 989.4e12,  # its Hopper GPU is the H100 / H200 SXM's
    "B200": 2.25e15,  # HGX B200 data sheet: 4.5 PFLOP/s with sparsity, per GPU
    "A100": 312e12,  # SXM4 and PCIe, 40 and 80 GB alike
    "A10": 125e12,
    "L4": 121e12,
    "L40": 181e12,
    "L40S": 362e12,
}
# The A10G (AWS) is left out: NVIDIA publishes no data sheet for it, so there is no figure to trust.

# The model of each name torch.cuda.get_device_name() gives, matched whole on the normalised name
# (lower case, without "NVIDIA ", "-" and "_" as spaces), so "L40" never matches "L4" or "L40S".
DEVICE_MODELS = (
    (re.compile(r"h100 80gb hbm3"), "H100 SXM"),
    (re.compile(r"h100 pcie"), "H100 PCIe"),
    (re.compile(r"h100 nvl"), "H100 NVL"),
    (re.compile(r"h200"), "H200 SXM"),
    (re.compile(r"h200 nvl"), "H200 NVL"),
    (re.compile(r"gh200 \d+gb?( hbm3e?)?"), "GH200"),  # "GH200 480GB", "GH200 144G HBM3e"
    (re.compile(r"b200"), "B200"),
    (re.compile(r"a100 (sxm4 (40|80)gb|pcie (40|80)gb|(40|80)gb pcie)"), "A100"),
    (re.compile(r"a10"), "A10"),
    (re.compile(r"l4"), "L4"),
    (re.compile(r"l40"), "L40"),
    (re.compile(r"l40s"), "L40S"),
)


def device_model(name: str) -> str | None:
    """The model (a key of PEAK_BF16_FLOPS) of a CUDA device name, or None for a device not listed."""
    normalised = " ".join(re.sub(r"[-_]", " ", name).lower().split()).removeprefix("nvidia ")
    return next((model for pattern, model in DEVICE_MODELS if pattern.fullmatch(normalised)), None)


def device_name(device: torch.device) -> str:
    """What the log calls a device: the CUDA device name, else its type ("cpu")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def device_peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device`: `peak_tflops` (trainer.peak_tflops) where set, else the table's, or None."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"trainer.peak_tflops must be positive, got {peak_tflops:g}: the device's TFLOP/s or null")
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    model = device_model(device_name(device))
    return PEAK_BF16_FLOPS[model] if model is not None else None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation, or None where the device's peak is unknown."""
    if peak_flops is None:
        return None
    return tokens_per_s_per_device * flops_per_token / peak_flops


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Throughput:
    """Tokens per second over the time spent in training steps since the last `read()`."""

    def __init__(self):
        self.tokens, self.seconds, self._start = 0, 0.0, 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, tokens: int) -> None:
        self.seconds += time.perf_counter() - self._start
        self.tokens += tokens

    def read(self) -> float:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        self.tokens, self.seconds = 0, 0.0
        return rate


class MetricsLogger:
    """Writes a line to the log, a record to `metrics.jsonl` and, if asked, TensorBoard scalars (rank 0 only).

    A session that resumes at `start_step` first drops the records of later steps, which the
    previous session wrote after its last checkpoint and this one is about to replay, so that
    every step appears once.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():
            _drop_records_after(path, start_step)
        self.jsonl = open(path, "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the earlier session's events from start_step + 1 on, for the same reason.
            self.writer = SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        log.info(format_record(record))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (and any line that does not parse), atomically."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass  # not ours to judge: keep it
        kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def format_record(record: dict) -> str:
    """One human line: `step 20 | loss 3.1416 | ...`."""
    parts = [f"step {record['step']}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("val_loss", "val_loss {:.4f}"),
        ("needle_accuracy", "needle {:.2f}"),
        ("needle_answer_loss", "needle_loss {:.3f}"),
        ("grad_norm", "grad_norm {:.3f}"),
        ("lr", "lr {:.2e}"),
        ("tokens_per_s", "tok/s {:,.0f}"),
        ("tokens_per_s_per_device", "tok/s/dev {:,.0f}"),
        ("mfu", "mfu {:.1%}"),
        ("peak_memory_gib", "mem {:.2f} GiB"),
    ):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return " | ".join(parts)
