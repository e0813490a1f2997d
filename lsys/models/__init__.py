"""Decoder LMs whose per-layer token mixer comes from config."""

import importlib
import pkgutil

from lsys.models.activations import ActivationPlan
from lsys.models.config import ModelConfig
from lsys.models.lm import LM, build_model
from lsys.models.registry import MIXERS, register_mixer

# Every module of this package is imported, so a mixer registers itself by existing here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ActivationPlan", "LM", "MIXERS", "ModelConfig", "build_model", "register_mixer"]
