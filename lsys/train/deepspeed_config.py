"""The DeepSpeed config of a run: built from the Hydra config, merged with the user's own JSON.

Kept apart from the engine so that start-up checks need no DeepSpeed import. DeepSpeed's data
parallel group is every rank (dp x sp: all of them hold a replica), so its batch is
micro_batch_size x grad_accum x world size, windows counted once per rank that reads a piece.
"""

import json
from pathlib import Path

from omegaconf import DictConfig

ZERO_STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "optimizer_and_params")
# lsys builds these itself (from optim.*), so a user's JSON may not bring its own.
OWNED_SECTIONS = ("optimizer", "scheduler")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed setting that cannot be used; one line per problem in `problems`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def derived_settings(cfg: DictConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed settings that follow from the Hydra config."""
    parallel, trainer = cfg.parallel, cfg.trainer
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}  # pinned host memory only pays on GPU
    if parallel.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": bf16}
    return {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": trainer.micro_batch_size * trainer.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
    }


def settings_problems(cfg: DictConfig) -> list[str]:
    """Problems with parallel.zero_stage, parallel.offload and parallel.deepspeed_config (the file's existence and syntax)."""
    parallel = cfg.parallel
    problems = []
    if parallel.zero_stage not in ZERO_STAGES:
        problems.append(f"parallel.zero_stage must be one of {ZERO_STAGES}, got {parallel.zero_stage!r}")
    if parallel.offload not in OFFLOADS:
        problems.append(f"parallel.offload must be one of {', '.join(OFFLOADS)}, got {parallel.offload!r}")
    elif parallel.offload == "optimizer_and_params" and parallel.zero_stage != 3:
        problems.append(
            f"parallel.offload=optimizer_and_params needs parallel.zero_stage=3 (got {parallel.zero_stage}): "
            "only ZeRO-3 partitions the parameters it would offload"
        )
    elif parallel.offload == "optimizer" and parallel.zero_stage == 0:
        problems.append("parallel.offload=optimizer needs parallel.zero_stage 1, 2 or 3 (ZeRO partitions what it offloads)")
    if parallel.deepspeed_config is not None:
        try:
            user_json(Path(parallel.deepspeed_config))
        except DeepSpeedConfigError as error:
            problems += error.problems
    return problems


def user_json(path: Path) -> dict:
    """The user's DeepSpeed JSON, or DeepSpeedConfigError when it is missing or does not parse."""
    if not path.is_file():
        raise DeepSpeedConfigError([f"parallel.deepspeed_config {str(path)!r} does not exist"])
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError([f"parallel.deepspeed_config {str(path)!r} is not valid JSON: {error}"]) from None
    if not isinstance(settings, dict):
        raise DeepSpeedConfigError([f"parallel.deepspeed_config {str(path)!r} must hold a JSON object"])
    return settings


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


# Where each derived DeepSpeed setting comes from, for the messages.
SOURCES = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "train_batch_size": "trainer.micro_batch_size x trainer.grad_accum x world size",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "trainer.precision",
}


def deepspeed_config(cfg: DictConfig, world_size: int, bf16: bool) -> dict:
    """The full DeepSpeed config: the user's JSON (if any) with lsys's derived settings, which it may not contradict."""
    ours = derived_settings(cfg, world_size, bf16)
    ours |= {"zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if cfg.parallel.deepspeed_config is None:
        return ours
    path = Path(cfg.parallel.deepspeed_config)
    user = user_json(path)
    problems = [
        f"parallel.deepspeed_config {str(path)!r} has a {section!r} section; lsys builds the optimizer and "
        "schedule from optim.*: remove it"
        for section in OWNED_SECTIONS if section in user
    ]
    flat_user, flat_ours = _flatten(user), _flatten(ours)
    for key, source in SOURCES.items():
        if key in flat_user and flat_user[key] != flat_ours[key]:
            problems.append(
                f"parallel.deepspeed_config sets {key} = {flat_user[key]!r}, but {source} gives {flat_ours[key]!r}"
            )
    if problems:
        raise DeepSpeedConfigError(problems)
    return _merge(user, ours)
