"""Shared helpers: run launch/train.py as users do (python or torchrun) and read what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `make test` runs the suite on pytest-xdist workers: each computes on one thread (set before torch
# starts its thread pool, and inherited by the ranks it spawns), so that they never fight over the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the thread setting above)

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


def compose_config(overrides: list[str], config_name: str = "config"):
    """The config as launch/train.py (or the app of `config_name`) composes it from these overrides."""
    from lsys.hydra_app import compose_config as compose_app_config

    return compose_app_config(CONF_DIR, config_name, overrides)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-process and end-to-end tests (`slow`) first: under xdist the long ones start early, short ones fill in."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a 2-step run of the tiny RAT (TINY, one process), trained once for the tests that read a
    trained run (once per session, so once per xdist worker); a test that changes it copies it."""
    folder = tmp_path_factory.mktemp("trained_run")
    run_dir = folder / "run"
    overrides = ["data=files", f"data.path={write_corpus(folder / 'corpus')}", *TINY, "trainer.max_steps=2",
                 f"run_dir={run_dir}"]
    result = run_train(overrides, cwd=folder)
    assert result.returncode == 0, result.stderr
    return run_dir
