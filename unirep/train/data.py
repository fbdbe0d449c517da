"""The task contract, data sets and the deterministic, resumable batch order.

A *task* maps a batch to named scalars (``{"loss": ..., "loss/flow": ...}``), the pattern of DiT's
``diffusion.training_losses`` and timm's ``TrainingTask``: the trainer knows no domain. ``DataModule`` only holds
data sets; the trainer builds the loaders.

The batch order is a pure function of ``(seed, step)``: epoch ``e`` shuffles with a ``torch.Generator`` seeded with
``seed + e`` (as ``torch.utils.data.DistributedSampler(seed=seed)`` does with ``set_epoch(e)``), so resuming at any
step replays exactly the batches an uninterrupted run would have seen, on any number of ranks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

__all__ = ["Task", "DataModule", "to_device", "ResumableBatchSampler"]


class Task(nn.Module, abc.ABC):
    """Base class of everything the trainer trains (see ``docs/architecture.md``).

    Subclasses set ``self.model`` (the network the trainer keeps an EMA of and samples/evaluates with) and implement
    ``forward(batch, step) -> dict`` with a differentiable scalar ``"loss"``; every other entry is a scalar that is
    logged as is. Optional methods the trainer and the command-line tools call when present:

    - ``on_step_end(step)``: after each optimiser step (e.g. an EMA-teacher update);
    - ``evaluate(data, out_dir, step) -> dict[str, float]``: runs with the EMA weights in ``self.model``;
    - ``sample(out_dir, num, seed, **kwargs) -> dict``: likewise.
    """

    model: nn.Module

    @abc.abstractmethod
    def forward(self, batch: Any, step: int) -> dict[str, Tensor]:
        """One training step's losses: ``{"loss": differentiable scalar, **logged scalars}``."""


@dataclass
class DataModule:
    """Data sets of a run.

    Args:
        train: the training set (map-style: ``__len__`` and ``__getitem__``).
        val: an optional validation set, passed to ``task.evaluate`` through this object.
        collate_fn: merges a list of items into a batch (default: torch's ``default_collate``).
        info: free-form facts about the data a task may need (number of classes, latent statistics, ...).
    """

    train: Dataset
    val: Dataset | None = None
    collate_fn: Callable[[list], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not hasattr(self.train, "__len__") or not hasattr(self.train, "__getitem__"):
            raise TypeError(
                "DataModule.train must be a map-style data set (__len__ and __getitem__), "
                f"got {type(self.train).__name__}"
            )
        if len(self.train) == 0:
            raise ValueError("DataModule.train is empty: point the data config at a non-empty data set")


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Move a batch to ``device``: tensors, mappings, lists, tuples (named ones too) and objects with ``.to``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device, non_blocking) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    if isinstance(batch, (str, bytes, Path)) or batch is None:
        return batch
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device)
    return batch


class ResumableBatchSampler(Sampler[list[int]]):
    """An endless stream of micro-batches of indices, one optimiser step after another, starting at any step.

    Step ``s`` uses the global batch ``perm_e[i * B:(i + 1) * B]`` with ``e, i = divmod(s, steps_per_epoch)`` and
    ``perm_e = randperm(n, generator=manual_seed(seed + e))`` (``drop_last``: an epoch is ``n // B`` steps). Rank ``r``
    of ``W`` takes every ``W``-th index of it, starting at ``r`` (``DistributedSampler``'s interleaving), and splits its
    share into ``accum_steps`` micro-batches. The union over ranks and micro-batches is the global batch, so the
    gradient of a mean loss does not depend on ``W`` or ``accum_steps``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        shuffle: bool = True,
    ) -> None:
        per_micro = batch_size // max(1, world_size * accum_steps)
        if batch_size <= 0 or per_micro * world_size * accum_steps != batch_size:
            raise ValueError(
                f"trainer.batch_size={batch_size} must be a positive multiple of world_size ({world_size}) x "
                f"trainer.accum_steps ({accum_steps}): change trainer.batch_size or trainer.accum_steps"
            )
        if num_samples < batch_size:
            raise ValueError(
                f"the training set has {num_samples} items, fewer than trainer.batch_size={batch_size}: "
                "lower trainer.batch_size or use more data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // batch_size

    def _perm(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        epoch, perm = -1, None
        while True:
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            share = perm[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world_size]
            for chunk in share.chunk(self.accum_steps):  # [B / (W * accum)] each
                yield chunk.tolist()
            step += 1

    def __len__(self) -> int:  # endless; the trainer stops at max_steps
        raise TypeError("ResumableBatchSampler is endless: iterate it for trainer.max_steps steps")
