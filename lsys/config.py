"""Start-up validation of the composed Hydra config: every problem found, each in one line."""

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kernels.backend import BACKENDS
from lsys.models import MIXERS, ActivationPlan, ModelConfig
from lsys.train.deepspeed_config import settings_problems as deepspeed_settings_problems
from lsys.train.engine import ENGINES
from lsys.train.optim import SCHEDULES
from lsys.train.resume import RESUME_OVERRIDES
from parallel.layout import LAYOUTS
from parallel.mesh import mesh_problems


class ConfigError(ValueError):
    """A config the run cannot start with; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def model_config(cfg: DictConfig) -> ModelConfig:
    """The `model` group as a ModelConfig; an unknown key raises ConfigError."""
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        return ModelConfig(**fields)
    except TypeError as error:
        raise ConfigError([f"model: {error} (see lsys/models/config.py for the settings)"]) from None


def activation_plan(trainer: DictConfig) -> ActivationPlan:
    """What a training step keeps for backward, from the `trainer` group (check `.problems()` before building)."""
    return ActivationPlan(
        checkpointing=trainer.activation_checkpointing, every=trainer.ac_every, loss_chunk=trainer.loss_chunk,
        mlp_chunk=trainer.mlp_chunk, offload=trainer.offload_activations,
    )


def check_model(model: ModelConfig, seq_len: int) -> list[str]:
    """Problems with the model's shape, its mixers and the sequence length it must take."""
    problems = []
    if model.n_heads <= 0 or model.d_model % model.n_heads:
        problems.append(f"model.d_model ({model.d_model}) must be a multiple of model.n_heads ({model.n_heads})")
    elif model.head_dim % 2:
        problems.append(f"model head dim d_model/n_heads = {model.head_dim} must be even for RoPE")
    if not model.layers:
        problems.append("model.layers is empty: name at least one mixer")
    if model.kernel_backend not in BACKENDS:
        choices = f"{', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}"
        problems.append(f"model.kernel_backend must be {choices}, got {model.kernel_backend!r}")
    if seq_len <= 0:
        problems.append(f"data.seq_len must be positive, got {seq_len}")
    elif seq_len > model.max_seq_len:
        problems.append(
            f"data.seq_len ({seq_len}) exceeds model.max_seq_len ({model.max_seq_len}), "
            "the longest sequence this model is built for"
        )
    for name in dict.fromkeys(model.layers):
        if name not in MIXERS:
            problems.append(f"model.layers: unknown mixer {name!r}; known mixers: {', '.join(sorted(MIXERS))}")
            continue
        options = model.mixer_options.get(name, {})
        try:
            problems += MIXERS[name].check(model, max(seq_len, 1), **options)
        except TypeError:
            problems.append(f"model.mixer_options.{name}: unknown option among {sorted(options)}")
    for name in model.mixer_options:
        if name not in model.layers:
            problems.append(f"model.mixer_options.{name}: no layer uses mixer {name!r}")
    return problems


def sequence_parallel_multiple(model: ModelConfig, pieces: int) -> int:
    """What a sequence split into `pieces` layout pieces must be a multiple of: each mixer's multiple, per piece."""
    options = model.mixer_options
    multiples = (MIXERS[name].sequence_multiple(model, **options.get(name, {})) for name in dict.fromkeys(model.layers))
    return pieces * math.lcm(*multiples)


def check_sequence_parallel(model: ModelConfig, seq_len: int, parallel: DictConfig) -> list[str]:
    """Problems splitting sequences of `seq_len` over `parallel.sp` ranks for this model's mixers."""
    sp, mode, layout = parallel.sp, parallel.sp_mode, parallel.layout
    problems = mesh_problems(sp, mode, parallel.ulysses)  # the world size is checked once it is known
    if layout not in LAYOUTS:
        problems.append(f"parallel.layout must be one of {LAYOUTS}, got {layout!r}")
    if problems or sp == 1:
        return problems
    pieces = sp * (2 if layout == "zigzag" else 1)
    if seq_len % pieces:
        problems.append(
            f"data.seq_len ({seq_len}) must be divisible by {pieces} "
            f"(sp={sp}{' x 2 for the zigzag layout' if layout == 'zigzag' else ''})"
        )
    mixers = set(model.layers)
    for name in dict.fromkeys(model.layers):
        if name not in MIXERS:
            continue  # check_model names it
        try:
            multiple = MIXERS[name].sequence_multiple(model, **model.mixer_options.get(name, {}))
        except TypeError:
            continue  # an unknown option, which check_model names
        # 1 is the pieces' own multiple, checked above; a size that is not positive is check_model's to name.
        if multiple > 1 and seq_len % (multiple * pieces):
            problems.append(
                f"data.seq_len ({seq_len}) must be divisible by {multiple} x {pieces} = {multiple * pieces}: "
                f"mixer {name!r} needs a multiple of {multiple} tokens in each of the {pieces} layout pieces"
            )
    ulysses = {"ring": 1, "ulysses": sp, "hybrid": parallel.ulysses}[mode]
    if mixers & {"attention", "local"} and model.n_heads % ulysses:
        problems.append(f"model.n_heads ({model.n_heads}) is not divisible by the Ulysses degree ({ulysses})")
    if "s2" in mixers and model.n_heads % sp:
        problems.append(f"model.n_heads ({model.n_heads}) is not divisible by parallel.sp ({sp}): S2 layers shard heads")
    return problems


def check_config(cfg: DictConfig) -> list[str]:
    """Every problem with `cfg` that shows without reading data; data problems raise DataError when it loads."""
    try:
        model = model_config(cfg)
        problems = check_model(model, cfg.data.seq_len) + check_sequence_parallel(model, cfg.data.seq_len, cfg.parallel)
    except ConfigError as error:
        problems = list(error.problems)
    trainer, optim = cfg.trainer, cfg.optim
    for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
        if trainer[key] <= 0:
            problems.append(f"trainer.{key} must be positive, got {trainer[key]}")
    problems += activation_plan(trainer).problems()
    if trainer.keep_checkpoints < 1:
        problems.append(f"trainer.keep_checkpoints must be at least 1, got {trainer.keep_checkpoints}")
    if trainer.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"trainer.precision must be auto, fp32 or bf16, got {trainer.precision!r}")
    if cfg.parallel.engine not in ENGINES:
        problems.append(f"parallel.engine must be one of {sorted(ENGINES)}, got {cfg.parallel.engine!r}")
    elif cfg.parallel.engine == "deepspeed":
        problems += deepspeed_settings_problems(cfg)
    if optim.lr <= 0:
        problems.append(f"optim.lr must be positive, got {optim.lr}")
    if not 0 <= optim.warmup_fraction < 1:
        problems.append(f"optim.warmup_fraction must be in [0, 1), got {optim.warmup_fraction}")
    if optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
    elif optim.schedule == "wsd" and not 0 < optim.decay_fraction <= 1 - optim.warmup_fraction:
        problems.append(
            f"optim.decay_fraction must be in (0, 1 - warmup_fraction], got {optim.decay_fraction}"
        )
    if str(cfg.resume) not in ("auto", "none") and not Path(str(cfg.resume)).is_dir():
        problems.append(f"resume={cfg.resume!r}: use auto, none, or an existing checkpoint folder")
    if cfg.resume_overrides not in RESUME_OVERRIDES:
        problems.append(f"resume_overrides must be one of {', '.join(RESUME_OVERRIDES)}, got {cfg.resume_overrides!r}")
    for key in ("spike_factor", "max_weight_growth"):  # factors: 1 or less would stop a healthy run
        if trainer[key] is not None and trainer[key] <= 1:
            problems.append(f"trainer.{key} must be above 1 or null, got {trainer[key]}")
    if trainer.max_grad_norm_abort is not None and trainer.max_grad_norm_abort <= 0:
        problems.append(f"trainer.max_grad_norm_abort must be positive or null, got {trainer.max_grad_norm_abort}")
    if trainer.peak_tflops is not None and trainer.peak_tflops <= 0:
        problems.append(f"trainer.peak_tflops must be positive (TFLOP/s) or null, got {trainer.peak_tflops}")
    if trainer.spike_window < 1:
        problems.append(f"trainer.spike_window must be at least 1, got {trainer.spike_window}")
    return problems


def device_problems(cfg: DictConfig, device: torch.device) -> list[str]:
    """Problems that show once the device a rank trains on is known."""
    if cfg.trainer.offload_activations and device.type != "cuda":
        return [
            "trainer.offload_activations=true needs a CUDA device, whose activations it moves to pinned host memory; "
            f"this run trains on {device.type}, where activations already live in host memory"
        ]
    return []
