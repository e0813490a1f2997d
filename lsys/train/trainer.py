"""The training loop: validate, build, resume, then step, log, evaluate and checkpoint."""

import logging
import random
import sys
from contextlib import closing
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lsys.config import ConfigError, check_config, model_config
from lsys.data import DataError, SequenceSlices, build_loaders, build_tokenizer
from lsys.eval.needle import EvalError, NeedleGrid, check_grid, evaluate_needle
from lsys.eval.report import mean_answer_loss
from lsys.models import build_model
from lsys.train.checkpoint import Checkpointer, CheckpointError, check_fits, rng_state, set_rng_state
from lsys.train.engine import ENGINES, NonFiniteLossError
from lsys.train.metrics import MetricsLogger, Throughput, device_peak_flops, peak_memory_bytes
from lsys.train.optim import build_optimizer, build_scheduler
from parallel import Mesh, World, barrier, init_distributed, init_mesh, shutdown
from parallel.mesh import mesh_problems

log = logging.getLogger("lsys")


def setup_logging(world: World, run_dir: Path | None) -> None:
    """Rank 0 logs INFO to stderr and `run_dir/train.log`; other ranks only warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if world.is_main else logging.WARNING)
    if not world.is_main:
        datasets.disable_progress_bars()  # one set of bars, rank 0's
    formatter = logging.Formatter("[lsys %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and world.is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: DictConfig, world: World, mesh: Mesh):
        self.cfg, self.world, self.mesh = cfg, world, mesh
        self.run_dir = Path(cfg.run_dir)
        self.trainer_cfg = cfg.trainer
        self.checkpointer = Checkpointer(self.run_dir, world, keep=cfg.trainer.keep_checkpoints)
        resume_from = self._resume_path()

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        model_cfg = model_config(cfg)
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                [f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}"]
            )
        self.train_loader, self.val_loader = build_loaders(
            cfg.data,
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.trainer.micro_batch_size,
            dp_rank=mesh.dp_rank,
            dp_size=mesh.dp,
            seed=cfg.seed,
            tokenizer=self.tokenizer,
        )
        if mesh.sp > 1:
            positions = mesh.layout.positions(mesh.sp_rank, cfg.data.seq_len)
            self.train_loader = SequenceSlices(self.train_loader, positions)
            if self.val_loader is not None:
                self.val_loader = SequenceSlices(self.val_loader, positions)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(model_cfg, world.device)
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
        self.engine = ENGINES[cfg.parallel.engine](
            self.model, optimizer, scheduler, world=world, grad_clip=cfg.optim.grad_clip, precision=cfg.trainer.precision
        )
        self.step, self.tokens_seen = 0, 0
        # Every dp replica reads micro_batch_size x grad_accum windows a step; its sp ranks share them.
        self.tokens_per_step = cfg.data.seq_len * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * mesh.dp
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.peak_flops = device_peak_flops(world.device)
        self.needle_grid = self._needle_grid(model_cfg.max_seq_len)
        self.resumed_from = None
        if resume_from is not None:
            self._restore(resume_from)

    def _needle_grid(self, max_seq_len: int) -> NeedleGrid | None:
        """The small needle grid of `trainer.eval_needle_every` (None when off), checked before any step."""
        tc = self.trainer_cfg
        if not tc.eval_needle_every:
            return None
        settings = OmegaConf.to_container(tc.needle, resolve=True)
        settings["lengths"] = settings["lengths"] or [self.cfg.data.seq_len]
        try:
            grid = NeedleGrid(**settings)
            check_grid(grid, self.tokenizer, max_seq_len=max_seq_len)
        except EvalError as error:
            raise ConfigError([f"trainer.needle: {error}"]) from None
        return grid

    @torch.no_grad()
    def needle_scores(self) -> dict[str, float]:
        """Mean accuracy (and answer loss, teacher-forced) on the training-time needle grid; every rank takes part."""
        with self.engine.autocast:
            results = evaluate_needle(self.model, self.tokenizer, self.needle_grid, progress=False)
        scores = {"needle_accuracy": sum(result.correct for result in results) / len(results)}
        if self.needle_grid.scoring == "teacher_forced":
            scores["needle_answer_loss"] = mean_answer_loss(results)
        return scores

    def describe(self) -> str:
        """What is being trained and from where: the run's first log lines."""
        model, mesh = self.model, self.mesh
        parallelism = f"dp {mesh.dp} x sp {mesh.sp}"
        if mesh.sp > 1:
            parallelism += f", {mesh.sp_mode}, {mesh.layout.kind} layout"
        lines = [
            f"model {model.cfg.name}: {model.num_params():,} parameters "
            f"({model.num_params(exclude_embedding=True):,} without embeddings), mixers {'/'.join(model.cfg.layers)}",
            f"{self.world.world_size} rank(s) on {self.world.device.type} ({parallelism}), "
            f"{self.tokens_per_step:,} tokens per step, {self.flops_per_token:.3g} FLOPs per token",
        ]
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        return "\n".join(lines)

    def _resume_path(self) -> Path | None:
        latest = self.checkpointer.latest()
        if self.cfg.resume == "auto":
            return latest
        if self.cfg.resume == "none":
            if latest is not None:
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoint {latest.name}; pass resume=auto to continue it "
                    "or choose another run_name"
                )
            return None
        return Path(self.cfg.resume)

    def _restore(self, path: Path) -> None:
        checkpoint = self.checkpointer.load(path)
        check_fits(checkpoint, self.model.state_dict())
        saved_world = checkpoint.trainer["world_size"]
        if saved_world != self.world.world_size or checkpoint.rank_state is None:
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} ranks, this job has {self.world.world_size}: "
                f"resume with --nproc_per_node={saved_world} (changing the world size on resume is not supported)"
            )
        self.train_loader.load_state_dict(checkpoint.rank_state["loader"])
        self.engine.load(checkpoint.model, checkpoint.optimizer, checkpoint.trainer["scheduler"])
        set_rng_state(checkpoint.rank_state["rng"])
        self.step, self.tokens_seen = checkpoint.trainer["step"], checkpoint.trainer["tokens_seen"]
        self.resumed_from = path

    def save(self) -> None:
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world.world_size,
            "scheduler": self.engine.scheduler.state_dict(),
        }
        rank_state = {"rng": rng_state(), "loader": self.train_loader.state_dict()}
        path = self.checkpointer.save(
            self.step, self.engine.model_state(), self.engine.optimizer_state(), trainer_state, rank_state
        )
        log.info("saved %s", path)

    def fit(self) -> None:
        tc = self.trainer_cfg
        if self.step >= tc.max_steps:
            log.info("run already complete: step %d of %d", self.step, tc.max_steps)
            return
        metrics = MetricsLogger(self.run_dir, enabled=self.world.is_main, tensorboard=tc.tensorboard)
        throughput = Throughput()
        batches = iter(self.train_loader)
        last_step = tc.max_steps if tc.stop_after_steps is None else min(tc.max_steps, self.step + tc.stop_after_steps)
        progress = tqdm(
            total=tc.max_steps, initial=self.step, desc="train", unit="step", mininterval=1.0,
            disable=not (self.world.is_main and tc.progress_bar), dynamic_ncols=True,
        )
        with logging_redirect_tqdm(), progress, closing(metrics):
            while self.step < last_step:
                throughput.start()
                micro_batches = list(islice(batches, tc.grad_accum))
                try:
                    result = self.engine.train_step(micro_batches)
                except NonFiniteLossError as error:
                    raise NonFiniteLossError(
                        f"non-finite training signal at step {self.step + 1} ({error}); nothing was saved for this "
                        f"step. Lower optim.lr or check the data; the last good checkpoint is {self.checkpointer.latest()}"
                    ) from None
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                throughput.stop(self.tokens_per_step)
                progress.update()
                progress.set_postfix(loss=f"{result.loss:.3f}", refresh=False)

                record = {"step": self.step}
                if self.step % tc.log_every == 0 or self.step in (1, last_step):
                    tokens_per_s = throughput.read()
                    per_device = tokens_per_s / self.world.world_size
                    record |= {
                        "loss": result.loss,
                        "grad_norm": result.grad_norm,
                        "lr": result.lr,
                        "tokens_seen": self.tokens_seen,
                        "tokens_per_s": tokens_per_s,
                        "tokens_per_s_per_device": per_device,
                        "mfu": per_device * self.flops_per_token / self.peak_flops if self.peak_flops else None,
                        "peak_memory_gib": peak_memory_bytes(self.world.device) / 2**30,
                    }
                if self.val_loader is not None and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                    record["val_loss"] = self.engine.evaluate(self.val_loader.batches(tc.eval_batches))
                if self.needle_grid is not None and (
                    self.step % tc.eval_needle_every == 0 or self.step == tc.max_steps
                ):
                    record |= self.needle_scores()
                if len(record) > 1:
                    metrics.write(record)
                if self.step % tc.checkpoint_every == 0 or self.step == last_step:
                    self.save()


def run(cfg: DictConfig) -> int:
    """Train as configured; returns the process exit code (0 done, 1 failed at run time, 2 bad config)."""
    world = init_distributed(cfg.parallel.backend)
    setup_logging(world, run_dir=None)
    try:
        par = cfg.parallel
        problems = check_config(cfg) + mesh_problems(par.sp, par.sp_mode, par.ulysses, world.world_size)
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))
        mesh = init_mesh(world, sp=par.sp, sp_mode=par.sp_mode, ulysses=par.ulysses, layout=par.layout)
        trainer = Trainer(cfg, world, mesh)
        run_dir = Path(cfg.run_dir)
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        barrier()
        setup_logging(world, run_dir)
        log.info("run directory %s", run_dir.resolve())
        for line in trainer.describe().splitlines():
            log.info(line)
        trainer.fit()
        barrier()  # leave together: a rank tearing its group down while a peer still talks aborts
        return 0
    except ConfigError as error:
        if world.is_main:
            for problem in error.problems:
                print(f"lsys: config error: {problem}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, NonFiniteLossError) as error:
        if world.is_main:
            print(f"lsys: error: {error}", file=sys.stderr)
        return 1 if not isinstance(error, DataError) else 2
    finally:
        shutdown()
