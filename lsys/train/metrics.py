"""Training metrics on rank 0: a log line, a JSONL record and optionally TensorBoard.

Throughput and MFU. `tokens/s` counts target tokens of the global batch per
second of wall time between two log lines (evaluation and checkpoint time excluded).
MFU = tokens/s per device * FLOPs per token / the device's peak dense bf16 FLOP/s,
where FLOPs per token = 6 * N (all weights, tied head included: forward 2N, backward 4N)
+ 3 * the mixers' token-mixing forward FLOPs (attention: 4 * d_model * (T+1)/2 per
layer when causal; RAT: 4 * d_model * ((T/L + 1)/2 + 1) plus its scan), see
`LM.flops_per_token`. MFU is left out where the peak is unknown (CPUs, unlisted GPUs).
"""

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by substring of the CUDA device name (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


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
