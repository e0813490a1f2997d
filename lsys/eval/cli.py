"""launch/eval_needle.py: score a checkpoint on the needle grid, write the report, print the mean accuracy last."""

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lsys.eval.needle import NeedleGrid, evaluate_needle
from lsys.eval.report import accuracy_table, summarize, write_report
from lsys.generate import load_for_generation
from lsys.train.checkpoint import CheckpointError, step_dir_name

log = logging.getLogger(__name__)


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a `ckpt=` setting points into: the parent of a step folder, else the path itself."""
    return ckpt.parent if ckpt.name.startswith("step-") else ckpt


def run(cfg: DictConfig) -> int:
    """Evaluate, write `out_dir` (default <run dir>/eval/needle-step-XXXXXXXX) and print the table; the exit code."""
    logging.basicConfig(level=logging.INFO, format="[lsys] %(message)s")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        grid = NeedleGrid(**OmegaConf.to_container(cfg.eval, resolve=True))
        model, tokenizer, step = load_for_generation(cfg.ckpt, device)
        results = evaluate_needle(model, tokenizer, grid, progress=cfg.progress_bar)
    except (CheckpointError, ValueError) as error:  # EvalError, ConfigError and DataError are ValueErrors
        print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    default_dir = run_dir_of(Path(cfg.ckpt)) / "eval" / f"needle-{step_dir_name(step)}"
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_dir
    summary = summarize(results, grid, model_name=model.cfg.name, step=step)
    write_report(results, summary, out_dir)
    log.info("wrote %s", out_dir)
    print("depth \\ length " + "".join(f"{length:>9}" for length in grid.lengths))
    for depth, row in zip(grid.depths, accuracy_table(summary)):
        print(f"{depth:>14g} " + "".join(f"{accuracy:>9.2f}" for accuracy in row))
    print(f"mean accuracy {summary['mean_accuracy']:.4f}")
    return 0
