"""Command lines of lsys's Hydra apps: overrides that do not compose are one line and exit code 2.

Hydra itself reports an unknown config option or key over several lines and exits 1, the
code lsys keeps for failures at run time. So each launch script composes its config once
before handing over to `hydra.main`, and stops there, quietly on every rank but 0.
"""

import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException


def composition_problem(config_dir: Path, config_name: str, overrides: list[str]) -> str | None:
    """Why these command-line overrides do not compose (one line), or None; Hydra's own flags are left to it."""
    if any(argument.startswith("-") for argument in overrides):
        return None  # --cfg, --help, --multirun ...: hydra.main parses and reports these
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra appends its search path to a missing option's message: not what the user needs to see.
        message = " ".join(str(error).split("Config search path:")[0].split())
        if error.__cause__ is not None:
            message += " (" + " ".join(str(error.__cause__).split()) + ")"
        return message
    return None


def exit_on_bad_overrides(config_dir: Path, config_name: str) -> None:
    """Exit with code 2 after one line on rank 0 when `sys.argv`'s overrides do not compose; return otherwise."""
    problem = composition_problem(config_dir, config_name, sys.argv[1:])
    if problem is None:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"lsys: config error: {problem}", file=sys.stderr)
    sys.exit(2)
