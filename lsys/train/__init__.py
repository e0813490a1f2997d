"""Training: the loop, engines, optimizer and schedule, checkpoints and metrics."""

from lsys.train.trainer import Trainer, run

__all__ = ["Trainer", "run"]
