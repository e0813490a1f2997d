"""The schema of every lsys config: one dataclass per group and per app, registered in Hydra's ConfigStore.

The dataclasses hold every setting's type and default; the YAML under conf/ holds only what differs.
Each app's config names its schema in its defaults list (`- train_schema`). Hydra then refuses a
mistyped value and a key the schema lacks, except where a `+` added it: `unknown_keys` finds those
in the composed config, so that `+trainer.max_stepz=3` is refused like `trainer.max_stepz=3`.

    group      schema                                   conf/
    model      lsys.models.config.ModelConfig           model/*.yaml
    data       lsys.data.config.DataConfig              data/*.yaml
    optim      lsys.train.config.OptimConfig            optim/*.yaml
    trainer    lsys.train.config.TrainerConfig          trainer/*.yaml
    parallel   lsys.train.config.ParallelConfig         parallel/*.yaml
    eval       lsys.eval.needle_settings.NeedleSettings eval/needle.yaml
               lsys.eval.sft.SftEvalSettings            eval/sft.yaml
"""

import dataclasses
import difflib
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lsys.data.config import DataConfig
from lsys.eval.needle_settings import NeedleSettings
from lsys.eval.sft import SftEvalSettings
from lsys.models.config import ModelConfig
from lsys.train.config import OptimConfig, ParallelConfig, PlanSettings, TrainerConfig


@dataclass
class TrainConfig:
    """launch/train.py and launch/sft.py (conf/config.yaml, conf/sft.yaml)."""

    seed: int = 1234
    run_name: str = "${model.name}-${data.name}"
    # Every rank uses this one folder: checkpoints, config.yaml, metrics.jsonl, train.log.
    run_dir: str = "runs/${run_name}"
    # auto: continue from the newest complete checkpoint in run_dir, if any;
    # none: start fresh (refuses a run_dir that holds checkpoints); or a checkpoint folder.
    resume: str = "auto"
    # A resumed session may change how the run is watched and how long it goes (logging, evaluation and
    # checkpoint cadence, trainer.max_steps); a change to optim.* is refused unless this is `apply`, which
    # puts it into the restored optimizer and schedule; any other change (model, data, seed, batch) is refused.
    resume_overrides: str = "refuse"
    # A checkpoint written by another number of ranks: true continues from its weights (gathered from ZeRO
    # shards too) with a fresh optimizer and data order, the step count and schedule going on; false refuses.
    resume_weights_only: bool = False
    # A checkpoint folder (either engine's), a run directory (its newest) or an export whose weights start a
    # new run, with a fresh optimizer, schedule and data order (fine-tuning: launch/sft.py); null: random init.
    # Used only when run_dir holds no checkpoint of its own.
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class PlanConfig(TrainConfig):
    """launch/plan.py (conf/plan.yaml): a training config and what to predict about it."""

    plan: PlanSettings = field(default_factory=PlanSettings)


@dataclass
class EvalNeedleConfig:
    """launch/eval_needle.py (conf/eval_needle.yaml)."""

    ckpt: str = MISSING  # a checkpoint folder (step-00000400), a run directory (its newest) or an export
    out_dir: str | None = None  # null: <run dir>/eval/needle-step-XXXXXXXX (samples, summary, heatmap.png)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    progress_bar: bool = True
    eval: NeedleSettings = field(default_factory=NeedleSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class EvalSftConfig:
    """launch/eval_sft.py (conf/eval_sft.yaml)."""

    ckpt: str = MISSING  # a checkpoint folder (step-00000400), a run directory (its newest) or an export
    out_dir: str | None = None  # null: <run dir>/eval/sft-step-XXXXXXXX (answers.jsonl, summary.json)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    micro_batch_size: int = 8  # held-out windows per forward for the loss
    progress_bar: bool = True
    eval: SftEvalSettings = field(default_factory=SftEvalSettings)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ExportConfig:
    """launch/export.py (conf/export.yaml)."""

    ckpt: str = MISSING  # a checkpoint folder (step-XXXXXXXX) or a run directory (its newest complete checkpoint)
    out: str = MISSING  # the folder to write (replaced if it exists)


@dataclass
class GenerateConfig:
    """launch/generate.py (conf/generate.yaml)."""

    ckpt: str = MISSING  # a checkpoint folder (step-00000400), a run directory (its newest) or an export
    prompts: list[str] = field(default_factory=lambda: ["def "])
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int = 0
    device: str = "auto"  # auto (cuda if present) | cpu | cuda


@dataclass
class PrepareSettings:
    """How launch/prepare_data.py tokenizes and writes shards (lsys/data/prepare.py)."""

    workers: int = 2  # tokenizing processes (1: in this process)
    shard_tokens: int = 2**26  # a shard closes at the first document boundary at or past this many tokens
    progress_bar: bool = True


@dataclass
class PrepareConfig:
    """launch/prepare_data.py (conf/prepare_data.yaml)."""

    data: DataConfig = field(default_factory=DataConfig)
    out: str = MISSING  # the shard set's folder (a killed run's folder: the rerun continues it)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)


SCHEMAS = {
    "train_schema": TrainConfig, "plan_schema": PlanConfig, "eval_needle_schema": EvalNeedleConfig,
    "eval_sft_schema": EvalSftConfig, "export_schema": ExportConfig, "generate_schema": GenerateConfig,
    "prepare_schema": PrepareConfig,
}


def register_configs() -> None:
    """Puts every app's schema into Hydra's ConfigStore, where the defaults lists under conf/ name them."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)


def unknown_key_problem(full_key: str, schema: type) -> str:
    """The line that refuses `full_key` (dotted), which the dataclass `schema` of its parent does not have."""
    prefix, _, key = full_key.rpartition(".")
    known = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else f"its settings: {', '.join(known)}"
    return f"unknown config key {full_key}: {schema.__name__} has no such setting ({hint})"


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """One line per key of `cfg` that its schema does not have (keys a `+` override slipped in), with a hint."""
    problems = []
    schema = OmegaConf.get_type(cfg)
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if name == "hydra":
            continue  # Hydra's own settings, which it checks itself
        if dataclasses.is_dataclass(schema) and key not in {f.name for f in dataclasses.fields(schema)}:
            problems.append(unknown_key_problem(name, schema))
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            problems += unknown_keys(child, f"{name}.")
    return problems
