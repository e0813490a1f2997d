"""`python launch/plan.py ...`: the planner (lsys/train/planner.py) for a training config, as a table per rank."""

import sys

from omegaconf import DictConfig

from lsys.config import ConfigError, activation_plan, check_model, check_sequence_parallel, model_config
from lsys.train.deepspeed_config import settings_problems as deepspeed_settings_problems
from lsys.train.engine import ENGINES
from lsys.train.planner import Plan, Setup, longest_sequence, plan, sequence_unit
from parallel.mesh import mesh_problems

MODES = ("peak", "max_seq_len")
DEVICES = ("gpu", "cpu")
GIB = 2**30


def plan_setup(cfg: DictConfig) -> Setup:
    """The Setup that `cfg` (a training config plus `plan`) describes; ConfigError lists every problem."""
    settings, parallel, trainer = cfg.plan, cfg.parallel, cfg.trainer
    problems = []
    model = model_config(cfg)  # an unknown model key raises ConfigError here
    world_size = settings.world_size if settings.world_size is not None else parallel.sp
    if settings.mode not in MODES:
        problems.append(f"plan.mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
    if settings.device not in DEVICES:
        problems.append(f"plan.device must be one of {', '.join(DEVICES)}, got {settings.device!r}")
    if settings.gpu_mem_gib <= 0:
        problems.append(f"plan.gpu_mem_gib must be positive, got {settings.gpu_mem_gib}")
    if world_size < 1:
        problems.append(f"plan.world_size must be positive, got {world_size}")
    else:
        problems += mesh_problems(parallel.sp, parallel.sp_mode, parallel.ulysses, world_size)
    # The model is free to grow past its max_seq_len here: the planner answers how far it could.
    model.max_seq_len = max(model.max_seq_len, cfg.data.seq_len)
    problems += check_model(model, cfg.data.seq_len) + check_sequence_parallel(model, cfg.data.seq_len, parallel)
    if parallel.engine not in ENGINES:
        problems.append(f"parallel.engine must be one of {sorted(ENGINES)}, got {parallel.engine!r}")
    elif parallel.engine == "deepspeed":
        problems += deepspeed_settings_problems(cfg)
    if trainer.micro_batch_size <= 0:
        problems.append(f"trainer.micro_batch_size must be positive, got {trainer.micro_batch_size}")
    activations = activation_plan(trainer)
    problems += activations.problems()
    if activations.offload and settings.device != "gpu":
        problems.append("trainer.offload_activations=true plans a GPU run: it needs plan.device=gpu")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    precision = "fp32" if settings.device == "cpu" or trainer.precision == "fp32" else "bf16"
    return Setup(
        model=model, seq_len=cfg.data.seq_len, micro_batch=trainer.micro_batch_size, world_size=world_size,
        sp=parallel.sp, sp_mode=parallel.sp_mode, ulysses=parallel.ulysses, engine=parallel.engine,
        zero_stage=parallel.zero_stage if parallel.engine == "deepspeed" else 0, offload=parallel.offload,
        activations=activations, precision=precision, grad_accum=trainer.grad_accum,
    )


def describe_setup(setup: Setup) -> str:
    engine = "DDP" if setup.engine != "deepspeed" else f"ZeRO-{setup.zero_stage}"
    if setup.engine == "deepspeed" and setup.offload != "none":
        engine += f" (offload {setup.offload})"
    act = setup.activations
    memory = [f"activation checkpointing {act.checkpointing}" + (f" (every {act.every})" if act.checkpointing == "every_n" else "")]
    if act.loss_chunk:
        memory.append(f"loss chunk {act.loss_chunk}")
    if act.mlp_chunk:
        memory.append(f"MLP chunk {act.mlp_chunk}")
    if act.offload:
        memory.append("activation offload")
    mesh = f"{setup.world_size} rank(s): dp {setup.dp} x sp {setup.sp}" + (f" ({setup.sp_mode})" if setup.sp > 1 else "")
    return (
        f"{setup.model.name}, seq_len {setup.seq_len:,}, micro batch {setup.micro_batch}, {mesh}, {engine}, "
        f"{setup.precision}, {', '.join(memory)}"
    )


def format_plan(result: Plan, budget: float | None = None) -> str:
    """The plan as lines of GiB per rank."""
    def row(label: str, value: float) -> str:
        return f"  {label:<42}{value / GIB:>10.2f} GiB"

    state = result.state
    lines = [f"plan: {describe_setup(result.setup)}", "device memory per rank at the step's peak:"]
    lines += [row("weights", state.weights), row("gradients", state.gradients), row("optimizer state", state.optimizer)]
    for kind, count in result.layers.items():
        lines.append(row(f"kept activations: {kind} ({count} layers)", result.kept[kind]))
    lines.append(row("kept activations: final norm and loss", result.kept["head"]))
    lines.append(row("working set (backward, recompute)", result.working_set))
    for name, value in result.buffers.items():
        lines.append(row(f"buffers: {name}", value))
    verdict = ""
    if budget is not None:
        verdict = f"  (fits in {budget / GIB:.0f} GiB)" if result.peak <= budget else f"  (does NOT fit in {budget / GIB:.0f} GiB)"
    lines.append(row("peak", result.peak) + verdict)
    if result.host:
        lines.append(row("host memory (offloaded)", result.host))
    if result.sent:
        lines.append("bytes this rank sends per step:")
        lines += [row(name, value) for name, value in result.sent.items()]
    return "\n".join(lines)


def run(cfg: DictConfig) -> int:
    """Print the plan (plan.mode=peak) or the longest sequence that fits (max_seq_len); 0, or 2 on bad input."""
    try:
        setup = plan_setup(cfg)
    except ConfigError as error:
        for problem in error.problems:
            print(f"lsys: config error: {problem}", file=sys.stderr)
        return 2
    budget = cfg.plan.gpu_mem_gib * GIB
    if cfg.plan.mode == "peak":
        print(format_plan(plan(setup), budget))
        return 0
    length, best = longest_sequence(setup, budget)
    if best is None:
        print(f"no sequence of {sequence_unit(setup):,} tokens or more fits in {cfg.plan.gpu_mem_gib} GiB per rank for: "
              f"{describe_setup(setup)}")
        return 0
    print(f"longest sequence that fits in {cfg.plan.gpu_mem_gib} GiB per rank: {length:,} tokens "
          f"(a multiple of {sequence_unit(setup):,}; set model.max_seq_len to it)")
    print(format_plan(best, budget))
    return 0
