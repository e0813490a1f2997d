"""The training loop: validate, build, resume, then step, log, evaluate and checkpoint."""

import logging
import os
import random
import shlex
import sys
from contextlib import closing
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lsys.config import ConfigError, activation_plan, check_config, device_problems, model_config
from lsys.data import DataError, PrefetchingLoader, SequenceSlices, build_loaders, build_tokenizer
from lsys.data.config import DataConfig
from lsys.eval.needle import EvalError, NeedleGrid, check_grid, evaluate_needle
from lsys.eval.report import mean_answer_loss
from lsys.models import build_model
from lsys.train.checkpoint import (
    MANIFEST, STEP_DIR, Checkpoint, Checkpointer, CheckpointError, check_fits, config_of, latest_checkpoint, rng_state,
    set_rng_state, step_dir_name,
)
from lsys.train.deepspeed_config import DeepSpeedConfigError, deepspeed_config
from lsys.train.engine import build_engine, uses_bf16
from lsys.train.export import consolidated_weights
from lsys.train.guard import DivergenceError, DivergenceGuard
from lsys.train.memory import memory_problem
from lsys.train.metrics import MetricsLogger, Throughput, device_name, device_peak_flops, mfu, peak_memory_bytes
from lsys.train.optim import apply_optimizer_settings
from lsys.train.resume import compare_configs
from lsys.train.run_lock import RunLock, RunLockedError, end_with_launcher
from parallel import Mesh, World, barrier, broadcast_from_main, init_distributed, init_mesh, shutdown
from parallel.mesh import collective_failure, mesh_problems

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
        self.resolved_config = OmegaConf.to_container(cfg, resolve=True)
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
        if cfg.data.prefetch_batches > 0:  # outermost, so that slicing and pinning run on its thread too
            self.train_loader = PrefetchingLoader(
                self.train_loader, prefetch_batches=cfg.data.prefetch_batches,
                pin_memory=world.device.type == "cuda", name=f"{cfg.data.name}-rank{world.rank}",
            )

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(model_cfg, world.device, activation_plan(cfg.trainer))
        # Counted before the engine, which under ZeRO-3 leaves each rank only its shards.
        self.num_params = (self.model.num_params(), self.model.num_params(exclude_embedding=True))
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        checkpoint = self.checkpointer.load(resume_from) if resume_from is not None else None
        weights_only = checkpoint is not None and self._weights_only(checkpoint)
        if weights_only:  # into the model before the engine copies it (ZeRO keeps fp32 masters of its own)
            self._check_changes(checkpoint, engine_may_change=True)
            weights = consolidated_weights(checkpoint.path)
            check_fits(checkpoint.path, weights, self.model.state_dict())
            self.model.load_state_dict(weights)
        self.initialised_from = None
        if checkpoint is None and cfg.get("init_from"):
            self._initialise_from(Path(cfg.init_from))
        self.engine = build_engine(self.model, cfg, world=world, max_steps=cfg.trainer.max_steps)
        self.step, self.tokens_seen = 0, 0
        # Every dp replica reads micro_batch_size x grad_accum windows a step; its sp ranks share them.
        self.tokens_per_step = cfg.data.seq_len * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * mesh.dp
        self.peak_flops = device_peak_flops(world.device, cfg.trainer.peak_tflops)
        self.needle_grid = self._needle_grid(model_cfg.max_seq_len)
        tc = cfg.trainer
        self.guard = DivergenceGuard(
            spike_factor=tc.spike_factor, window=tc.spike_window, max_grad_norm=tc.max_grad_norm_abort,
            max_weight_growth=tc.max_weight_growth,
        )
        self.resumed_from = None
        if weights_only:
            self._continue_from_weights(checkpoint)
        elif checkpoint is not None:
            self.restore(checkpoint)

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
        with self.engine.autocast, self.engine.full_weights():
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
            f"model {model.cfg.name}: {self.num_params[0]:,} parameters "
            f"({self.num_params[1]:,} without embeddings), mixers {'/'.join(model.cfg.layers)}",
            f"{self.world.world_size} rank(s) on {self.world.device.type} ({parallelism}), "
            f"{self.tokens_per_step:,} tokens per step, {self.flops_per_token:.3g} FLOPs per token",
        ]
        if self.peak_flops is None:
            lines.append(f"MFU: unknown peak for device {device_name(self.world.device)}; set trainer.peak_tflops")
        data = DataConfig.from_attrs(self.cfg.data)
        if data.doc_isolation:
            restart = "from each document's start" if data.restarts_positions else "from the window's start"
            lines.append(f"documents kept apart in packed windows (data.doc_isolation), positions counted {restart}")
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        elif self.initialised_from is not None:
            lines.append(f"weights from {self.initialised_from} (init_from); optimizer, schedule and data start fresh")
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

    def _initialise_from(self, path: Path) -> None:
        """Start from the weights of a pretrained checkpoint (either engine's), a run's newest one, or an export.

        Only the weights come over: the optimizer, schedule, step count and data order start fresh.
        """
        if path.is_dir() and not (path / MANIFEST).is_file() and not STEP_DIR.match(path.name):
            path = latest_checkpoint(path) or path  # a run directory: its newest complete checkpoint
        if (path / "trainer.json").is_file():
            self.checkpointer.load(path)  # verified like a resume: complete, checksums match
        elif not (path / MANIFEST).is_file():
            raise CheckpointError(
                f"init_from={path} is not a complete checkpoint, run directory or export (no {MANIFEST} manifest)"
            )
        weights = consolidated_weights(path)
        check_fits(path, weights, self.model.state_dict())
        self.model.load_state_dict(weights)
        self.initialised_from = path
        # Shapes fit; a setting that leaves them alone (a chunk size, a window) may still differ from pretraining.
        pretrained = config_of(path).get("model", {})
        for key in sorted(pretrained.keys() & self.resolved_config["model"].keys()):
            if key != "name" and pretrained[key] != self.resolved_config["model"][key]:
                log.warning("init_from: model.%s is %s here but was %s in pretraining", key,
                            self.resolved_config["model"][key], pretrained[key])

    def _weights_only(self, checkpoint: Checkpoint) -> bool:
        """Whether to continue from the checkpoint's weights alone: it was written by another world size and
        the user asked for that (resume_weights_only=true); any other world-size change is refused."""
        saved_world = checkpoint.trainer["world_size"]
        if saved_world == self.world.world_size and checkpoint.rank_state is not None:
            return False
        if not self.cfg.resume_weights_only:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written by {saved_world} ranks, this job has "
                f"{self.world.world_size}: resume with --nproc_per_node={saved_world}, or pass resume_weights_only=true "
                "to continue from its weights with a fresh optimizer and data order (the step count and schedule go on)"
            )
        return True

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a full checkpoint of this world size; one refused for its config or its weights' shapes
        (the ddp engine checks them before applying any) leaves the model, optimizer, data and RNG as they were."""
        apply_optimizer = self._check_changes(checkpoint)  # names a changed setting before its effects show below
        # Nothing is applied before the engine has checked its files against the model.
        self.engine.load(checkpoint.path, checkpoint.trainer["scheduler"])
        self.train_loader.load_state_dict(checkpoint.rank_state["loader"])
        if apply_optimizer:
            apply_optimizer_settings(self.engine.optimizer, self.engine.scheduler, self.cfg.optim)
        set_rng_state(checkpoint.rank_state["rng"])
        self.step, self.tokens_seen = checkpoint.trainer["step"], checkpoint.trainer["tokens_seen"]
        self.resumed_from = checkpoint.path

    def _continue_from_weights(self, checkpoint: Checkpoint) -> None:
        """The weights are in; the optimizer is new, the schedule moves to the checkpoint's step, the data starts over."""
        self.step, self.tokens_seen = checkpoint.trainer["step"], checkpoint.trainer["tokens_seen"]
        scheduler = self.engine.scheduler
        scheduler.last_epoch = self.step - 1
        scheduler.step()  # sets every group's lr for the position
        self.resumed_from = checkpoint.path
        log.info("continuing from the weights of %s (written by %d ranks) with a fresh optimizer and data order",
                 checkpoint.path, checkpoint.trainer["world_size"])

    def _check_changes(self, checkpoint: Checkpoint, engine_may_change: bool = False) -> bool:
        """Refuse settings that would change what a resumed run trains; True when optimizer changes are to be applied."""
        if checkpoint.config is None:
            log.warning("checkpoint %s records no config (lsys before 0.2): resuming without comparing settings",
                        checkpoint.path)
            return False
        changes = compare_configs(checkpoint.config, self.resolved_config, engine_may_change=engine_may_change)
        problems = [
            f"{change} would change what {checkpoint.path} was trained as; start a new run (another run_name) "
            "or drop the override" for change in changes.refused
        ]
        if changes.optimizer and self.cfg.resume_overrides != "apply":
            problems += [
                f"{change} differs from {checkpoint.path}: pass resume_overrides=apply to apply it to the restored "
                "optimizer and schedule, or drop the override" for change in changes.optimizer
            ]
        if problems:
            raise ConfigError(problems)
        for change in changes.free + changes.optimizer:
            log.info("resume: applying %s", change)
        return bool(changes.optimizer)

    def save(self) -> None:
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world.world_size,
            "engine": self.cfg.parallel.engine,
            "scheduler": self.engine.scheduler.state_dict(),
        }
        rank_state = {"rng": rng_state(), "loader": self.train_loader.state_dict()}
        path = self.checkpointer.save(self.step, self.engine, trainer_state, rank_state, config=self.resolved_config)
        log.info("saved %s", path)

    def divergence_message(self, error: DivergenceError) -> str:
        """What went wrong at the next step, and how to go on from the newest checkpoint (all of them precede it)."""
        step = self.step + 1
        lower_lr = f"{self.cfg.optim.lr / 10:g}"
        latest = self.checkpointer.latest()
        if latest is None:
            advice = f"No checkpoint was written before it; start again with a lower lr, e.g. optim.lr={lower_lr}"
        else:
            advice = (
                f"The newest checkpoint, written before it, is {latest}; resume from it with a lower lr:\n  "
                + resume_command(latest, lower_lr)
            )
        return f"training stopped at step {step} ({error}); nothing was saved for this step. {advice}"

    def fit(self) -> None:
        tc = self.trainer_cfg
        if self.step >= tc.max_steps:
            log.info("run already complete: step %d of %d", self.step, tc.max_steps)
            return
        metrics = MetricsLogger(
            self.run_dir, enabled=self.world.is_main, tensorboard=tc.tensorboard, start_step=self.step
        )
        throughput = Throughput()
        batches = iter(self.train_loader)
        last_step = tc.max_steps if tc.stop_after_steps is None else min(tc.max_steps, self.step + tc.stop_after_steps)
        progress = tqdm(
            total=tc.max_steps, initial=self.step, desc="train", unit="step", mininterval=1.0,
            disable=not (self.world.is_main and tc.progress_bar), dynamic_ncols=True,
        )
        self.guard.check_weights(self.engine.weight_norm())  # the norm the first update is measured against
        with logging_redirect_tqdm(), progress, closing(metrics), closing(self.train_loader):
            while self.step < last_step:
                throughput.start()
                micro_batches = list(islice(batches, tc.grad_accum))
                try:
                    result = self.engine.train_step(micro_batches, self.guard)
                    self.guard.check_weights(result.weight_norm)
                except DivergenceError as error:
                    raise DivergenceError(self.divergence_message(error)) from None
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
                        "mfu": mfu(per_device, self.flops_per_token, self.peak_flops),
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


def resume_command(checkpoint: Path, lr: str) -> str:
    """The command line of this job, resuming from `checkpoint` with optimizer settings changed to `lr`."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started through Hydra's command line
        overrides = []
    replaced = ("resume=", "optim.lr=", "resume_overrides=")
    kept = [override for override in overrides if not override.startswith(replaced)]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size == 1:
        launcher = ["python"]
    elif world_size == per_node:
        launcher = ["torchrun", f"--nproc_per_node={per_node}"]
    else:
        launcher = ["torchrun", f"--nnodes={world_size // per_node}", f"--nproc_per_node={per_node}", "<rendezvous options>"]
    arguments = [*kept, f"resume={checkpoint}", f"optim.lr={lr}", "resume_overrides=apply"]
    return " ".join([*launcher, "launch/train.py", *map(shlex.quote, arguments)])


def record_config(run_dir: Path, cfg: DictConfig, start_step: int) -> Path:
    """Write this session's resolved config: config.yaml for a run's start, config-step-XXXXXXXX.yaml for a resume.

    config.yaml is never rewritten once a checkpoint exists, so it always describes what ran first.
    """
    path = run_dir / ("config.yaml" if start_step == 0 else f"config-{step_dir_name(start_step)}.yaml")
    OmegaConf.save(cfg, path, resolve=True)
    return path


def run(cfg: DictConfig) -> int:
    """Train as configured; returns the process exit code (0 done, 1 failed at run time, 2 bad config or input).

    Only rank 0 prints a start-up error; every rank returns the same code.
    """
    end_with_launcher()
    world = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    setup_logging(world, run_dir=None)
    lock = RunLock(cfg.run_dir)
    try:
        par = cfg.parallel
        problems = check_config(cfg) + mesh_problems(par.sp, par.sp_mode, par.ulysses, world.world_size)
        if problems:
            raise ConfigError(list(dict.fromkeys(problems)))
        if par.engine == "deepspeed":  # the batch size it checks needs the world size, known only now
            try:
                deepspeed_config(cfg, world.world_size, bf16=uses_bf16(world.device, cfg.trainer.precision))
            except DeepSpeedConfigError as error:
                raise ConfigError(error.problems) from None
        problems = device_problems(cfg, world.device)
        if problems:
            raise ConfigError(problems)
        if not cfg.trainer.skip_memory_check:
            problem = memory_problem(
                model_config(cfg), world.device, engine=par.engine, zero_stage=par.zero_stage, offload=par.offload,
                world_size=world.world_size, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size)),
                bf16=uses_bf16(world.device, cfg.trainer.precision),
            )
            if problem is not None:
                raise ConfigError([problem])
        mesh = init_mesh(world, sp=par.sp, sp_mode=par.sp_mode, ulysses=par.ulysses, layout=par.layout)
        trainer = Trainer(cfg, world, mesh)
        run_dir = Path(cfg.run_dir)
        # Rank 0 holds the run directory for the whole run; nothing is written before it does.
        locked_by = None
        if world.is_main:
            try:
                lock.acquire()
            except RunLockedError as error:
                locked_by = str(error)
        locked_by = broadcast_from_main(locked_by)
        if locked_by is not None:
            raise RunLockedError(locked_by)
        if world.is_main:
            record_config(run_dir, cfg, trainer.step)
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
    except (DataError, RunLockedError) as error:
        if world.is_main:
            print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, DivergenceError) as error:
        if world.is_main:
            print(f"lsys: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not collective_failure(error):
            raise
        # Every rank that sees it says so: the one that died or hangs may be rank 0.
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(
            f"lsys: error: rank {world.rank}: a collective failed (parallel.timeout_s={cfg.parallel.timeout_s}); "
            f"another rank died or hangs: {first_line}", file=sys.stderr,
        )
        return 1
    finally:
        lock.release()
        shutdown()
