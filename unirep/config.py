"""Structured-config schemas of the command-line apps, registered in hydra's ConfigStore.

``configs/train.yaml`` starts with ``defaults: [base_train, ...]``, so every top-level and ``trainer`` key of a run
is checked against :class:`TrainConfig` / :class:`TrainerConfig` when hydra composes it: a misspelt key stops at
start-up with its name (hydra structured configs; lightning-hydra-template's habit of experiments as config files).
``data``, ``task``, ``optimizer`` and ``scheduler`` are free-form: hydra instantiates them, and a wrong key inside
them fails with the callable's "unexpected keyword argument" error, which names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["TrainerConfig", "TrainConfig", "SampleConfig", "EvalConfig", "register_configs"]


@dataclass
class TrainerConfig:
    """Keyword arguments of :class:`unirep.train.Trainer` (see its docstring)."""

    max_steps: int = 1000
    batch_size: int = 64
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    log_every: int = 50
    eval_every: int = 0
    ckpt_every: int = 1000
    keep_last: int = 3
    num_workers: int = 0
    accum_steps: int = 1
    precision: str = "bf16"
    device: str = "auto"
    resume: str = "auto"
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    max_bad_steps: int = 10
    progress: bool = True
    tensorboard: bool = True
    eval_at_end: bool = True
    find_unused_parameters: bool = False
    handle_signals: bool = True
    num_threads: int = 0


@dataclass
class TrainConfig:
    """Top level of ``unirep-train``."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "outputs/${name}"
    data: Any = MISSING
    task: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    smoke: list[str] = field(default_factory=list)


@dataclass
class SampleConfig:
    """Top level of ``unirep-sample``: draw samples from a trained checkpoint."""

    checkpoint: str = MISSING
    num: int = 64
    seed: int = 0
    ema: bool = True
    device: str = "auto"
    out_dir: str | None = None
    sample: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Top level of ``unirep-eval``: evaluate a trained checkpoint on its data."""

    checkpoint: str = MISSING
    ema: bool = True
    device: str = "auto"
    out_dir: str | None = None
    data: Any = None


def register_configs() -> None:
    """Register the schemas as ``base_train``, ``base_sample``, ``base_eval`` and ``trainer/base_trainer``."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(name="base_sample", node=SampleConfig)
    cs.store(name="base_eval", node=EvalConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)


register_configs()
