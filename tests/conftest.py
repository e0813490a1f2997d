"""Shared helpers: run launch/train.py as users do (python or torchrun) and read what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors only in the interpreter, and Triton reads this when a
# kernel module is imported; so set it before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# A small, fast model and batch for end-to-end runs on 2 CPU cores.
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.ffn_dim=128",
    "data.seq_len=64",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=1000",
    "trainer.eval_batches=2",
    "trainer.progress_bar=false",
]


def compose_config(overrides: list[str]):
    """The training config as launch/train.py composes it from these overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train_command(overrides: list[str], nproc: int = 1, script: str = "launch/train.py") -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / script), *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / script), *overrides,
    ]


def run_train(
    overrides: list[str], cwd: Path, nproc: int = 1, timeout: float = 300, script: str = "launch/train.py"
) -> subprocess.CompletedProcess:
    """Run a training job (launch/train.py, or `script`: launch/sft.py) in `cwd`; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        train_command(overrides, nproc, script), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_corpus(folder: Path) -> Path:
    """A small folder of real text (a slice of the stdlib's source) for quick training runs."""
    import sysconfig

    folder.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "colorsys.py", "shlex.py"):
        (folder / f"{name}.txt").write_text((stdlib / name).read_text(encoding="utf-8"))
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")
