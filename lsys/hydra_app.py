"""Command lines of lsys's Hydra apps: overrides that do not compose are one line and exit code 2.

Hydra itself reports an unknown config option or key over several lines and exits 1, the
code lsys keeps for failures at run time, and lets a `+` override add a key no schema has.
So each launch script composes its config once, schema-checked (lsys/schema.py), before
handing over to `hydra.main`, and stops there, quietly on every rank but 0.
"""

import os
import sys
from dataclasses import is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lsys.schema import register_configs, unknown_key_problem, unknown_keys


class CompositionError(ValueError):
    """Overrides that do not compose into a config its schema accepts; the message is one line."""


def compose_config(config_dir: Path, config_name: str, overrides: list[str], **compose_options) -> DictConfig:
    """The app config `config_name` under these overrides, as its launch script gets it; raises CompositionError."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, **compose_options)
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and is_dataclass(cause.object_type):
            # A key the schema lacks: the same line as for `+key=...` (Hydra's own suggests adding the `+`).
            raise CompositionError(unknown_key_problem(cause.full_key, cause.object_type)) from None
        # Hydra appends its search path to a missing option's message: not what the user needs to see.
        message = " ".join(str(error).split("Config search path:")[0].split())
        if error.__cause__ is not None:
            message += " (" + " ".join(str(error.__cause__).split()) + ")"
        raise CompositionError(message) from None
    problems = unknown_keys(cfg)
    if problems:
        raise CompositionError("; ".join(problems))
    return cfg


def composition_problem(config_dir: Path, config_name: str, overrides: list[str]) -> str | None:
    """Why these command-line overrides do not compose (one line), or None; Hydra's own flags are left to it."""
    if any(argument.startswith("-") for argument in overrides):
        register_configs()  # hydra.main handles --cfg, --help, --multirun ... itself, and needs the schemas too
        return None
    try:
        compose_config(config_dir, config_name, overrides, return_hydra_config=True)
    except CompositionError as error:
        return str(error)
    return None


def exit_on_bad_overrides(config_dir: Path, config_name: str) -> None:
    """Registers the schemas (hydra.main needs them), then exits with code 2 after one line on rank 0 when
    `sys.argv`'s overrides do not compose, or returns."""
    problem = composition_problem(config_dir, config_name, sys.argv[1:])
    if problem is None:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"lsys: config error: {problem}", file=sys.stderr)
    sys.exit(2)
