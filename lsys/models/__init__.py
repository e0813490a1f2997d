"""Decoder LMs whose per-layer token mixer comes from config."""

# Importing a mixer module registers it.
from lsys.models import attention, lightning, local, rat, s2  # noqa: F401
from lsys.models.config import ModelConfig
from lsys.models.lm import LM, build_model
from lsys.models.registry import MIXERS, register_mixer

__all__ = ["LM", "MIXERS", "ModelConfig", "build_model", "register_mixer"]
