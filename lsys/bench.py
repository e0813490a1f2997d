"""Benchmarks whose results go to docs/perf.md. Ratios come from runs made side by side in one call."""

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainThroughput:
    model: str
    nproc: int
    tokens_per_s: float
    tokens_per_s_per_device: float
    final_loss: float


def measure_training(model: str, nproc: int, steps: int, work_dir: Path, overrides: list[str]) -> TrainThroughput:
    """Run launch/train.py under torchrun and average tokens/s over the logged intervals after the first."""
    run_dir = work_dir / f"{model}-np{nproc}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "launch/train.py"), f"model={model}", f"run_dir={run_dir}", "resume=none",
        f"trainer.max_steps={steps}", "trainer.log_every=10", f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.progress_bar=false", *overrides,
    ]
    # One intra-op thread per process so that 1 and 2 processes use 1 and 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=work_dir, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][2:]  # steps 1 and 2-10 include warm-up
    return TrainThroughput(
        model=model,
        nproc=nproc,
        tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed),
        tokens_per_s_per_device=sum(r["tokens_per_s_per_device"] for r in timed) / len(timed),
        final_loss=records[-1]["loss"],
    )


def training_table(results: list[TrainThroughput]) -> str:
    """Markdown table with each row's speed relative to the first row."""
    base = results[0].tokens_per_s
    lines = [
        "| model | processes | tokens/s (global) | tokens/s per process | vs first row | loss at end |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.nproc} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_per_device:,.0f} | "
            f"{r.tokens_per_s / base:.2f}x | {r.final_loss:.3f} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"


def write_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` + body into the markdown file at `path`, replacing that section if present."""
    text = path.read_text() if path.exists() else "# Performance\n\nEach table is written by the command shown with it.\n\n"
    sections = re.split(r"(?m)^(?=## )", text)
    new = f"## {heading}\n\n{body.strip()}\n\n"
    kept = [new if section.startswith(f"## {heading}\n") else section for section in sections]
    if new not in kept:
        kept.append(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(kept).rstrip() + "\n")
