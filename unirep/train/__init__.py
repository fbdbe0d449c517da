"""Training: the task contract, data modules, the trainer, checkpoints (see ``docs/architecture.md``)."""

from unirep.train.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, load_task, save_checkpoint
from unirep.train.data import DataModule, ResumableBatchSampler, Task, to_device
from unirep.train.ema import EMA, frozen_prefixes, trainable_state
from unirep.train.logging import MetricLogger, plot_loss_curve, read_metrics
from unirep.train.trainer import Trainer, lr_factor, seed_everything

__all__ = [
    "Task",
    "DataModule",
    "Trainer",
    "to_device",
    "save_checkpoint",
    "load_checkpoint",
    "load_task",
    "find_checkpoint",
    "list_checkpoints",
    "EMA",
    "frozen_prefixes",
    "trainable_state",
    "ResumableBatchSampler",
    "MetricLogger",
    "plot_loss_curve",
    "read_metrics",
    "lr_factor",
    "seed_everything",
]
