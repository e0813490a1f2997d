"""launch/eval_needle.py: score a checkpoint on the needle grid, write the report, print the mean accuracy last."""

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lsys.eval.needle import EvalError, NeedleGrid, evaluate_needle
from lsys.eval.report import accuracy_table, summarize, write_report
from lsys.generate import load_for_generation
from lsys.train.checkpoint import CheckpointError, step_dir_name
from parallel import barrier, init_distributed, init_mesh, shutdown
from parallel.mesh import mesh_problems

log = logging.getLogger(__name__)


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a `ckpt=` setting points into: the parent of a step folder, else the path itself."""
    return ckpt.parent if ckpt.name.startswith("step-") else ckpt


def run(cfg: DictConfig) -> int:
    """Evaluate, write `out_dir` (default <run dir>/eval/needle-step-XXXXXXXX) and print the table; the exit code.

    Under torchrun every rank evaluates (dp replicas share the prompts, `parallel.sp` ranks
    share each sequence) and global rank 0 writes and prints.
    """
    logging.basicConfig(level=logging.INFO, format="[lsys] %(message)s")
    par = cfg.parallel
    world = init_distributed(par.backend, par.timeout_s)
    try:
        problems = mesh_problems(par.sp, par.sp_mode, par.ulysses, world.world_size)
        if problems:
            raise EvalError("; ".join(problems))
        init_mesh(world, sp=par.sp, sp_mode=par.sp_mode, ulysses=par.ulysses, layout=par.layout)
        device = world.device if cfg.device == "auto" else torch.device(cfg.device)
        grid = NeedleGrid(**OmegaConf.to_container(cfg.eval, resolve=True))
        model, tokenizer, step = load_for_generation(cfg.ckpt, device)
        results = evaluate_needle(model, tokenizer, grid, progress=cfg.progress_bar)
        barrier()  # leave together: a rank tearing its group down while a peer still talks aborts
    except (CheckpointError, ValueError) as error:  # EvalError, ConfigError and DataError are ValueErrors
        if world.is_main:
            print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if not world.is_main:
        return 0
    default_dir = run_dir_of(Path(cfg.ckpt)) / "eval" / f"needle-{step_dir_name(step)}"
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_dir
    summary = summarize(results, grid, model_name=model.cfg.name, step=step)
    write_report(results, summary, out_dir)
    log.info("wrote %s", out_dir)
    print("depth \\ length " + "".join(f"{length:>9}" for length in grid.lengths))
    for depth, row in zip(grid.depths, accuracy_table(summary)):
        print(f"{depth:>14g} " + "".join(f"{accuracy:>9.2f}" for accuracy in row))
    if summary["mean_answer_loss"] is not None:
        print(f"mean answer loss {summary['mean_answer_loss']:.4f} nats")
    print(f"mean accuracy {summary['mean_accuracy']:.4f}")
    return 0
