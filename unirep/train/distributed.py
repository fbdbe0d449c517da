"""Data-parallel set-up under ``torchrun`` (``torch.distributed.run``).

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; the process group uses NCCL on GPUs and gloo on CPU.
Each rank processes ``batch_size / world_size`` items per step so the global batch does not depend on the number of
processes; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "shutdown",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_gather_object",
    "all_reduce_mean",
]


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> torch.device:
    """Initialise the process group if launched by torchrun; return this rank's device."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cuda", "cpu") and not device.startswith("cuda:"):
        raise ValueError(f"trainer.device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda:"):
        return torch.device(device)
    if _env_world() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            # rank 0 evaluates alone while the others wait at a barrier: allow long evaluations
            dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=timedelta(hours=2))
        return torch.device("cuda", local) if want_cuda else torch.device("cpu")
    return torch.device("cuda") if want_cuda else torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in-process communication, never read from disk)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def shutdown() -> None:
    """Destroy the process group if one was created (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
