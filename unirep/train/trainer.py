"""One readable training loop for every task (images, molecules, toys).

The loop follows DiT's and REPA's ``train.py`` (AdamW, gradient clipping, EMA of the network, periodic checkpoints)
and nanoGPT's ``train.py`` (one explicit loop with named steps, gradient accumulation, exact resume). Per step:

1. ``accum_steps`` micro-batches (each ``batch_size / (world_size * accum_steps)`` items), loss / accum_steps
   backpropagated (DDP syncs gradients on the last micro-batch only);
2. gradient clipping (the total norm is logged), a NaN/inf guard that skips the update and stops after
   ``max_bad_steps`` consecutive bad steps;
3. optimiser step, EMA update, learning-rate schedule (warm-up, then constant or cosine), ``task.on_step_end``;
4. logging (CSV, TensorBoard, progress bar), evaluation with the EMA weights swapped in, checkpoints.

Everything random is a function of ``seed`` and the step (data order: :class:`ResumableBatchSampler`; generator
states: saved in checkpoints), so N steps + resume + N steps equals 2N steps bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from unirep.config import TrainerConfig
from unirep.train import distributed as dist_utils
from unirep.train.checkpoint import (
    OutDirLock,
    _remove_checkpoint,
    clean_leftovers,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
)
from unirep.train.data import DataModule, ResumableBatchSampler, to_device
from unirep.train.ema import EMA
from unirep.train.logging import MetricLogger

__all__ = ["Trainer", "seed_everything", "lr_factor", "trainer_config", "config_changes", "SIGNAL_EXIT_CODES"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


SCHEDULES = ("constant", "cosine")
# Exit codes of a run stopped by a signal (the shell's 128 + signal number): SIGINT 130, SIGTERM 143, SIGUSR1 138.
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138}


def _check_schedule(schedule: str, min_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.lr_schedule={schedule!r}: use one of {', '.join(map(repr, SCHEDULES))}")
    if not (isinstance(min_ratio, (int, float)) and 0.0 <= min_ratio <= 1.0):
        raise ValueError(f"trainer.min_lr_ratio={min_ratio!r}: use a fraction of the peak learning rate in [0, 1]")


def lr_factor(
    step: int, max_steps: int, warmup_steps: int = 0, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier of the optimiser step ``step`` (0-based): linear warm-up to 1, then the schedule.

    ``"constant"``: 1. ``"cosine"``: from 1 down to ``min_ratio`` at ``max_steps`` (half a cosine period).
    """
    _check_schedule(schedule, min_ratio)  # before the warm-up returns, so a misspelt name fails at step 0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trainer_config(options: dict[str, Any]) -> TrainerConfig:
    """A validated :class:`~unirep.config.TrainerConfig` from keyword options; every problem is named at once."""
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"Trainer: unknown option(s) {unknown}; the options are {sorted(known)}")
    c = TrainerConfig(**options)
    problems = []
    for name in ("max_steps", "eval_every", "ckpt_every", "keep_last", "num_workers", "num_threads", "warmup_steps"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 0:
            problems.append(f"trainer.{name}={getattr(c, name)!r} must be an integer >= 0")
    for name in ("batch_size", "log_every", "accum_steps", "max_bad_steps"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) <= 0:
            problems.append(f"trainer.{name}={getattr(c, name)!r} must be an integer > 0")
    for name in ("grad_clip", "max_weight_growth"):
        if not (isinstance(getattr(c, name), (int, float)) and math.isfinite(getattr(c, name))):
            problems.append(f"trainer.{name}={getattr(c, name)!r} must be a finite number (0 disables it)")
    if not (isinstance(c.ema_decay, (int, float)) and 0.0 <= c.ema_decay < 1.0):
        problems.append(f"trainer.ema_decay={c.ema_decay!r} must be in [0, 1) (REPA/DiT: 0.9999)")
    if c.precision not in ("bf16", "fp32"):
        problems.append(f"trainer.precision={c.precision!r}: use 'bf16' or 'fp32'")
    try:
        _check_schedule(c.lr_schedule, c.min_lr_ratio)
    except ValueError as err:
        problems.append(str(err))
    problems += _device_problems(c.device)
    if problems:
        raise ValueError("invalid trainer options: " + "; ".join(problems))
    return c


def _device_problems(device: str) -> list[str]:
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(device)):
        return [f"trainer.device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [
            f"trainer.device={device} but CUDA is not available here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}): use trainer.device=cpu or auto"
        ]
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return [f"trainer.device={device}: this machine has {torch.cuda.device_count()} GPU(s)"]
    return []


class _RngGuard:
    """Save and restore every generator around code that must not change the training stream (evaluation)."""

    def __enter__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


# Keys a resumed run may change. Schedule keys are recomputed (the LambdaLR closure reads them); optimiser
# hyper-parameters are written into the restored parameter groups; the rest take effect from the next step.
_RESUMABLE = {f"trainer.{f.name}" for f in dataclasses.fields(TrainerConfig)} | {"name", "out_dir", "seed", "smoke"}
_SCHEDULE_KEYS = ("trainer.max_steps", "trainer.warmup_steps", "trainer.lr_schedule", "trainer.min_lr_ratio")


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(applicable, refused)``: keys (dotted) whose values differ between a checkpoint's config and this run's."""
    a, b = _flatten(stored), _flatten(current)
    applicable, refused = {}, {}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old == new or (isinstance(old, list) and isinstance(new, tuple) and tuple(old) == new):
            continue
        ok = key in _RESUMABLE or key.startswith("smoke") or (key.startswith("optimizer.") and "._" not in key)
        (applicable if ok else refused)[key] = (old, new)
    return applicable, refused


class Trainer:
    """Train a :class:`~unirep.train.Task` on a :class:`~unirep.train.DataModule`.

    Args:
        task: the task (a module whose ``forward(batch, step)`` returns ``{"loss": ..., ...}`` and with ``.model``).
        data: data sets; the trainer builds the loader.
        optimizer: a callable taking the trainable parameters (hydra ``_partial_: true`` AdamW), or a built optimiser.
        scheduler: optional callable taking the optimiser and returning an LR scheduler stepped once per step;
            default: warm-up + ``lr_schedule`` through ``LambdaLR``.
        seed: seeds generators and the data order.
        out_dir: where metrics, TensorBoard logs, checkpoints and evaluation outputs go (one run at a time: locked).
        config: the resolved run config stored in checkpoints (what :func:`~unirep.train.load_task` rebuilds from,
            and what a resumed run is compared with).
        trainer_cfg: a :class:`unirep.config.TrainerConfig`; keyword ``options`` override its fields.
        **options: the fields of :class:`unirep.config.TrainerConfig`, which holds their defaults:

            max_steps, batch_size: optimiser steps in total (a resumed run continues up to it); global batch per step
            (split over ranks and ``accum_steps`` micro-batches). grad_clip: max total gradient norm (0: none; the
            norm is logged). ema_decay, ema_warmup: EMA of ``task.model`` (REPA/DiT 0.9999; warm-up
            ``min(d, (1+n)/(10+n))``). log_every, eval_every, ckpt_every, keep_last: intervals in steps (0 disables
            eval/checkpoints; a checkpoint and, with ``eval_at_end``, an evaluation follow the last step) and
            checkpoints kept. num_workers, num_threads: loader processes; torch CPU threads during fit (0: as is).
            precision: ``"bf16"`` (autocast on CUDA) or ``"fp32"``. device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``.
            resume: ``"auto"`` (newest checkpoint of ``out_dir`` that verifies), ``"none"`` or a path. overwrite:
            let ``resume=none`` replace a finished run's checkpoints. reset_ema: resume a checkpoint without EMA
            weights with the EMA restarted from the raw ones. warmup_steps, lr_schedule, min_lr_ratio: the default
            schedule (:func:`lr_factor`). final_lr, final_lr_from: from that step (or fraction of max_steps) on,
            the lr is ``final_lr`` whatever the schedule (mace's stage two sets ``--swa_lr``). max_bad_steps:
            consecutive non-finite steps before stopping.
            max_weight_growth: the run is unhealthy (no checkpoint is written) when the weights' norm grew more than
            this factor since the last healthy checkpoint (0: only finiteness is checked). progress, tensorboard,
            eval_at_end, find_unused_parameters (DDP). handle_signals: SIGINT/SIGTERM/SIGUSR1 finish the current
            step, write a checkpoint and return ``interrupted=True`` (``trainer.resume=auto`` continues exactly).

    Exceptions during a step (a corrupt image, a second Ctrl-C) write an emergency checkpoint of the last complete
    step when the state is healthy and single-process, then propagate.
    """

    def __init__(
        self,
        task: nn.Module,
        data: DataModule,
        optimizer: OptimizerFactory | torch.optim.Optimizer,
        *,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        seed: int = 0,
        out_dir: str | Path = "outputs/run",
        config: dict[str, Any] | None = None,
        trainer_cfg: TrainerConfig | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(task, nn.Module) or not isinstance(getattr(task, "model", None), nn.Module):
            raise TypeError(f"Trainer: task must be an nn.Module with a .model submodule, got {type(task).__name__}")
        base = dataclasses.asdict(trainer_cfg) if trainer_cfg is not None else {}
        self.cfg = trainer_config({**base, **options})
        self.task, self.data, self.optimizer_spec, self.scheduler_spec = task, data, optimizer, scheduler
        self.seed, self.out_dir, self.config = seed, Path(out_dir), config
        self.step = 0
        self.bad_steps = 0  # total skipped steps
        self.ema: EMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.last_eval: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self._steps_per_epoch = max(1, len(data.train) // max(1, self.cfg.batch_size))
        self._stop_signal: str | None = None
        self.interrupted = False
        self.stop_signal: str | None = None
        self._history: list[dict[str, Any]] = []  # config changes applied at each resume (stored in checkpoints)

    @property
    def max_steps(self) -> int:
        return self.cfg.max_steps

    # -- setup -----------------------------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        """Check and lock ``out_dir`` (rank 0): a file, a read-only folder or a live run there stops here."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(
                f"out_dir {out} is a file, not a folder: choose another out_dir (the file is kept)"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = OutDirLock(out)
            note = self._lock.acquire()
        except OSError as err:
            raise OSError(
                err.errno, f"out_dir {out} cannot be written ({err.strerror or err}): choose a writable out_dir"
            ) from None
        if note:
            print(f"[unirep] {out}: {note}", flush=True)
        removed = clean_leftovers(out / "checkpoints")
        if removed:
            print(f"[unirep] removed leftovers of killed runs: {', '.join(p.name for p in removed)}", flush=True)

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if isinstance(self.optimizer_spec, torch.optim.Optimizer):
            return self.optimizer_spec
        try:
            opt = self.optimizer_spec(params)
        except (TypeError, ValueError) as err:
            raise type(err)(f"optimizer: building it failed ({err}); check the values under optimizer.") from err
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: the factory returned {type(opt).__name__}; use a torch optimizer with _partial_: true"
            )
        return opt

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        if self.scheduler_spec is not None:
            return self.scheduler_spec(optimizer)
        c = self.cfg  # the closure reads the config, so a resume with a new max_steps recomputes the schedule
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, c.max_steps, c.warmup_steps, c.lr_schedule, c.min_lr_ratio)
        )

    def _setup(self) -> None:
        """Device, out_dir lock, optimiser, scheduler and EMA."""
        self.device = dist_utils.init_distributed(self.cfg.device)
        self.world, self.main = dist_utils.world_size(), dist_utils.is_main()
        self._lock = None
        if self.main:
            self._prepare_out_dir()
        task = self.task.to(self.device)
        task.train()
        self.params = [p for p in task.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                f"{type(task).__name__} has no trainable parameters (requires_grad=True): nothing to train"
            )
        self.optimizer = self._build_optimizer(self.params)
        self.scheduler = self._build_scheduler(self.optimizer)
        self._plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.cfg.final_lr is not None and not float(self.cfg.final_lr) > 0:
            raise ValueError(f"trainer.final_lr={self.cfg.final_lr!r}: give a positive learning rate, or null for none")
        if self._plateau and (not self.cfg.monitor or self.cfg.eval_every <= 0):
            raise ValueError(
                "a ReduceLROnPlateau scheduler steps on an evaluation metric: set trainer.monitor (e.g. "
                f"val/f_mae_meV_A) and trainer.eval_every > 0 (got monitor={self.cfg.monitor!r}, "
                f"eval_every={self.cfg.eval_every})"
            )
        self.ema = EMA(task.model, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)

    # -- resume ----------------------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        resume = str(self.cfg.resume)
        if resume in ("none", "None", "null", "false", "False", ""):
            return None
        if resume == "auto":
            if find_checkpoint(self.out_dir / "checkpoints") is None:
                return None
            return resolve_checkpoint(self.out_dir / "checkpoints", log=self._log, skipped=self._damaged)
        if find_checkpoint(resume) is None:
            raise FileNotFoundError(
                f"trainer.resume={resume}: no checkpoint there (expected a step_N folder with state.json or a run "
                "folder); use trainer.resume=auto or none"
            )
        return resolve_checkpoint(resume, log=self._log, skipped=self._damaged)

    def _log(self, msg: str) -> None:
        if dist_utils.is_main():
            print(msg, flush=True)

    def _guard_existing(self, start: int, source: Path | None) -> None:
        """Refuse to mix this run's checkpoints with another run's in ``out_dir`` unless ``trainer.overwrite``."""
        root = self.out_dir / "checkpoints"
        for bad in self._damaged:  # kept for inspection, out of the way of resume and rotation
            if bad.parent.resolve() == root.resolve() and bad.exists():
                aside = root / f".damaged-{bad.name}-{os.getpid()}"
                os.replace(bad, aside)
                self._log(f"[unirep] moved the damaged checkpoint {bad.name} aside to {aside}")
        clash = [
            p
            for p in list_checkpoints(root)
            if int(p.name.split("_")[1]) >= start and (source is None or p.resolve() != source.resolve())
        ]
        if not clash:
            return
        if not self.cfg.overwrite:
            how = "trainer.resume=none" if source is None else f"resuming {source} at step {start}"
            raise FileExistsError(
                f"{root} already holds checkpoints of another run ({', '.join(p.name for p in clash[-3:])}) and {how} "
                "would mix this run's with them: continue it with trainer.resume=auto, choose another out_dir, or pass "
                "trainer.overwrite=true to delete them"
            )
        for p in clash:
            _remove_checkpoint(p)
        self._log(f"[unirep] trainer.overwrite=true: deleted {len(clash)} checkpoint(s) of the earlier run in {root}")

    def _resume(self) -> int:
        """Load the checkpoint to resume (if any) and reconcile its config with this run's; returns the start step."""
        self._damaged: list[Path] = []
        source = self._resume_path() if self.main or self.world == 1 else None
        if self.world > 1:  # rank 0 resolved (and verified) the path; every rank loads that same folder
            source = dist_utils.all_gather_object(source)[0]
        start = 0
        if source is None:
            seed_everything(self.seed + dist_utils.rank())
        else:
            start = self._load(source)
        if self.main:
            self._guard_existing(start, source)
        self.step = start
        self._resumed = source is not None
        return start

    def _load(self, source: Path) -> int:
        state = read_state(source)
        stored = state.get("config")
        applied = self._check_config(stored, source) if isinstance(stored, dict) and self.config else {}
        reset_ema = self.cfg.reset_ema and not (source / "ema.safetensors").is_file()
        load_checkpoint(
            source,
            self.task,
            None if reset_ema else self.ema,
            self.optimizer,
            self.scheduler,
            restore_rng=True,
            rank=dist_utils.rank(),
        )
        if reset_ema:
            self.ema = EMA(self.task.model, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)
            self._log(f"[unirep] {source} has no EMA weights: trainer.reset_ema=true restarts the EMA from the weights")
        start = int(state["step"])
        extra = state.get("extra", {})
        self.bad_steps = int(extra.get("bad_steps", 0))
        self._history = list(extra.get("resume_changes", []))
        if applied:
            self._apply_changes(applied, stored, start)
            self._history.append({"step": start, "changes": {k: list(v) for k, v in applied.items()}})
        self._warn_data_order(extra.get("data", {}), source)
        self._log(f"[unirep] resumed from {source} at step {start}")
        return start

    def _check_config(self, stored: dict[str, Any], source: Path) -> dict[str, tuple]:
        applicable, refused = config_changes(stored, self.config)
        if refused:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:10])
            raise ValueError(
                f"resuming {source}: the run config differs in keys a resumed run cannot change ({shown}). Restore "
                "them, or start a new run in another out_dir (or trainer.resume=none trainer.overwrite=true)"
            )
        return {k: v for k, v in applicable.items() if not k.startswith(("trainer.resume", "trainer.overwrite"))}

    def _apply_changes(self, applied: dict[str, tuple], stored: dict[str, Any], start: int) -> None:
        """Write changed optimiser values into the restored parameter groups; log every change and the new lr."""
        lr_before = [g["lr"] for g in self.optimizer.param_groups]
        for key, (old, new) in applied.items():
            if not key.startswith("optimizer."):
                continue
            name = key.split(".", 1)[1]
            for i, group in enumerate(self.optimizer.param_groups):
                if name == "lr" and isinstance(old, (int, float)) and old:
                    ratio = float(new) / float(old)  # keeps the schedule's position and any per-group scale
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
                    if hasattr(self.scheduler, "base_lrs"):
                        self.scheduler.base_lrs[i] *= ratio
                elif name in group:
                    group[name] = tuple(new) if isinstance(group[name], tuple) else new
                else:
                    raise ValueError(f"resume: {key} changed but the optimiser has no {name!r} to set")
        if any(k in applied for k in _SCHEDULE_KEYS) and self.scheduler_spec is None:
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base * factor
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in applied.items())
        lr_after = [g["lr"] for g in self.optimizer.param_groups]
        self._log(f"[unirep] resume at step {start} applies: {shown}; lr {lr_before[0]:.4g} -> {lr_after[0]:.4g}")

    def _warn_data_order(self, saved: dict[str, Any], source: Path) -> None:
        c = self.cfg
        if saved and (saved.get("batch_size"), saved.get("seed")) != (c.batch_size, self.seed):
            warnings.warn(
                f"resuming {source} with batch_size/seed {c.batch_size}/{self.seed} instead of "
                f"{saved.get('batch_size')}/{saved.get('seed')}: the data order will differ from the original run",
                stacklevel=3,
            )

    # -- the loader, the logger ------------------------------------------------------------------------------------
    def _build_loader(self, start: int) -> Iterator:
        c = self.cfg
        sampler = ResumableBatchSampler(
            len(self.data.train), c.batch_size, self.seed, start, dist_utils.rank(), self.world, c.accum_steps
        )
        self._steps_per_epoch = sampler.steps_per_epoch
        loader = DataLoader(
            self.data.train,
            batch_sampler=sampler,
            collate_fn=self.data.collate_fn,
            num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda",
            # the loader draws its worker base seed from this generator, not from the global one, which would
            # otherwise shift the task's random stream on every (re)start
            generator=torch.Generator().manual_seed(self.seed + 1_000_003 * start),
        )
        return iter(loader)

    # -- one step --------------------------------------------------------------------------------------------------
    def _forward_backward(self, batches: Iterator, step: int) -> dict[str, torch.Tensor]:
        """``accum_steps`` micro-batches: forward, backward of loss / accum_steps; returns the averaged outputs."""
        sums: dict[str, torch.Tensor] = {}
        n = self.cfg.accum_steps
        for micro in range(n):
            batch = to_device(next(batches), self.device)
            sync = self.wrapped.no_sync() if (self.world > 1 and micro < n - 1) else nullcontext()
            with sync:
                with self.autocast:
                    out = self.wrapped(batch, step)
                if "loss" not in out:
                    raise KeyError(
                        f"{type(self.task).__name__}.forward must return a dict with 'loss'; got {list(out)}"
                    )
                (out["loss"].float() / n).backward()
            for k, v in out.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                if v.numel() != 1:
                    raise ValueError(
                        f"{type(self.task).__name__}.forward returned {k!r} with shape {tuple(v.shape)}: every "
                        "entry must be a scalar (reduce it, e.g. .mean(), before returning)"
                    )
                sums[k] = sums.get(k, 0) + v.reshape(()) / n
        return sums

    def _train_step(self, batches: Iterator, step: int) -> bool:
        """One optimiser step (or a skipped one); returns whether every rank asked to stop."""
        if self.world == 1:  # the generators as the step starts: what an emergency checkpoint of this step stores
            self._rng_at_step = rng_state()
        self._phase = "step"
        sums = self._forward_backward(batches, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self._max_norm)
        ok = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
        stop = self._stop_signal is not None
        if self.world > 1:  # every rank must take the same decisions: [apply this step, keep running]
            flags = torch.stack([ok.float(), torch.tensor(float(not stop))]).to(self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
            ok, stop = flags[0] > 0, bool(flags[1] == 0)
        self._phase = "update"  # from here to the end of the step the state is half-updated
        if bool(ok):
            self.optimizer.step()
            self.ema.update(self.task.model)
            self._consecutive_bad = 0
            if self._on_step_end is not None:
                self._on_step_end(step)
            for k, v in sums.items():
                self._window[k] = self._window.get(k, 0) + v
            self._window["grad_norm"] = self._window.get("grad_norm", 0) + grad_norm.detach().float()
            self._window_steps += 1
        else:
            self._skip_step(step, sums["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if not self._plateau:  # a plateau schedule steps after each evaluation instead (_step_plateau)
            self.scheduler.step()
        self._apply_final_lr(step + 1)
        self.step = step + 1
        self._phase = "done"
        return stop if self.world > 1 else self._stop_signal is not None  # one process: a signal during this step

    def final_lr_start(self) -> int | None:
        """The step from which ``trainer.final_lr`` holds (None: never)."""
        c = self.cfg
        if c.final_lr is None:
            return None
        return int(round(c.final_lr_from * c.max_steps)) if 0 < c.final_lr_from < 1 else int(c.final_lr_from)

    def _apply_final_lr(self, step: int) -> None:
        """From :meth:`final_lr_start` on every group's lr is ``final_lr`` (mace's stage two), whatever the schedule."""
        start = self.final_lr_start()
        if start is not None and step >= start:
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.cfg.final_lr)

    def _skip_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bad_steps += 1
        self._consecutive_bad += 1
        self._log(
            f"[unirep] step {step}: non-finite loss/gradient (loss={float(loss):.4g}, "
            f"grad_norm={float(grad_norm):.4g}); update skipped ({self._consecutive_bad} in a row)"
        )
        if self._consecutive_bad >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"{self._consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step {step}, "
                f"trainer.max_bad_steps={self.cfg.max_bad_steps}): lower the learning rate, enable trainer.grad_clip, "
                "use trainer.precision=fp32, or check the data for NaN/inf"
            )

    # -- log, eval, checkpoint -------------------------------------------------------------------------------------
    def _log_window(self, done: int) -> None:
        now = time.perf_counter()
        keys = sorted(self._window)
        vals = (
            torch.stack([self._window[k].to(self.device) / max(1, self._window_steps) for k in keys]) if keys else None
        )
        if vals is not None:
            vals = dist_utils.all_reduce_mean(vals).cpu()
        if self.main:
            row = dict(zip(keys, vals.tolist(), strict=True)) if vals is not None else {}
            row.update(
                lr=self.optimizer.param_groups[0]["lr"],
                bad_steps=self.bad_steps,
                steps_per_sec=self._window_steps / max(now - self._t_last, 1e-9) if self._window_steps else 0.0,
                epoch=(done - 1) // self._steps_per_epoch,
            )
            self.logger.log(done, row)
            if "loss" in row:
                self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}")
        self._window, self._window_steps, self._t_last = {}, 0, now

    def evaluate(self, step: int, logger: MetricLogger | None) -> dict[str, Any]:
        """``task.evaluate`` on rank 0 with the EMA weights in ``task.model``; the training RNG stream is untouched."""
        fn = getattr(self.task, "evaluate", None)
        if fn is None:
            return {}
        metrics: dict[str, Any] = {}
        if dist_utils.is_main():
            was_training = self.task.training
            self.task.eval()
            with _RngGuard(), self.ema.swapped_into(self.task.model):
                metrics = dict(fn(self.data, self.out_dir, step) or {})
            self.task.train(was_training)
            if logger is not None:
                logger.log_eval(step, metrics)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"[unirep] eval at step {step}: {shown}", flush=True)
        dist_utils.barrier()
        self.last_eval = metrics
        if getattr(self, "_plateau", False):
            self._step_plateau(metrics)
        return metrics

    def _step_plateau(self, metrics: dict[str, Any]) -> None:
        """ReduceLROnPlateau on ``trainer.monitor`` (rank 0's value, shared with every rank)."""
        name = self.cfg.monitor
        value = torch.tensor(float("nan"), device=self.device)
        if dist_utils.is_main():
            if name not in metrics:
                raise KeyError(
                    f"trainer.monitor={name!r} is not among the evaluation metrics {sorted(metrics)}: "
                    "set trainer.monitor to one of them"
                )
            value.fill_(float(metrics[name]))
        if self.world > 1:
            torch.distributed.broadcast(value, src=0)
        self.scheduler.step(float(value))

    def _weight_norm(self) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in self.params])))

    def health(self) -> str | None:
        """Why the run is unhealthy (a checkpoint now would preserve a broken state), or None when it is healthy."""
        if self._consecutive_bad:
            return f"the last {self._consecutive_bad} step(s) had a non-finite loss or gradient"
        norm = self._weight_norm()
        if not math.isfinite(norm):
            return "the weights hold NaN or inf"
        if not all(bool(torch.isfinite(v).all()) for v in self.ema.shadow.values() if v.is_floating_point()):
            return "the EMA weights hold NaN or inf"
        growth = self.cfg.max_weight_growth
        if growth > 0 and norm > growth * max(self._healthy_norm, 1e-12):
            return (
                f"the weights' norm grew {norm / max(self._healthy_norm, 1e-12):.3g}x (to {norm:.3g}) since the last "
                f"healthy checkpoint (trainer.max_weight_growth={growth:g})"
            )
        return None

    def save(self, step: int, rng: Any = None) -> Path | None:
        """Write a checkpoint (rank 0) when the run is healthy; every rank takes part (RNG states are gathered)."""
        why = self.health()
        if why is not None:
            self._log(f"[unirep] no checkpoint at step {step}: {why}; the last healthy one is {self.last_checkpoint}")
            return None
        rng = dist_utils.all_gather_object(rng_state()) if rng is None else [rng]
        path = None
        if dist_utils.is_main():
            c = self.cfg
            extra = {
                "bad_steps": self.bad_steps,
                "resume_changes": self._history,
                # the data position is a function of (seed, step, batch_size): recorded here for reading and checks
                "data": {
                    "seed": self.seed,
                    "batch_size": c.batch_size,
                    "world_size": dist_utils.world_size(),
                    "accum_steps": c.accum_steps,
                    "steps_per_epoch": self._steps_per_epoch,
                    "epoch": step // self._steps_per_epoch,
                    "step_in_epoch": step % self._steps_per_epoch,
                },
            }
            path = save_checkpoint(
                self.out_dir / "checkpoints",
                step,
                self.task,
                ema=self.ema,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                config=self.config,
                rng=rng,
                extra=extra,
                keep_last=c.keep_last,
            )
            self.last_checkpoint = path
        self._healthy_norm, self._saved_step = self._weight_norm(), step
        dist_utils.barrier()
        return path

    def _emergency_checkpoint(self, err: BaseException) -> None:
        """After an exception: save the last complete step if the state is consistent, healthy and not saved yet."""
        phase = getattr(self, "_phase", None)  # None: setup had not finished, there is nothing to save
        if phase not in ("step", "done") or self.world > 1 or self.step in (self._start, self._saved_step):
            return
        try:
            path = self.save(self.step, rng=self._rng_at_step if phase == "step" else rng_state())
        except Exception as save_err:  # noqa: BLE001 (the original error is the one to report)
            self._log(f"[unirep] emergency checkpoint failed too: {save_err}")
            return
        if path is not None:
            self._log(
                f"[unirep] {type(err).__name__} during step {self.step + (phase == 'step')}: emergency checkpoint of "
                f"step {self.step} written to {path}; fix the cause and resume with trainer.resume=auto"
            )

    # -- signals -----------------------------------------------------------------------------------------------------
    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM/SIGUSR1/SIGINT stop at the end of the current step (main thread); a second SIGINT interrupts."""
        self._stop_signal, self.interrupted, self.stop_signal = None, False, None
        if not self.cfg.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt  # pressed twice: stop now (an emergency checkpoint is still tried)
            self._stop_signal = signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("\n[unirep] Ctrl-C: finishing the step and writing a checkpoint (again to stop now)", flush=True)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # -- the loop --------------------------------------------------------------------------------------------------
    def _start_loop(self, start: int) -> None:
        """Loader, autocast, logger, progress bar and the per-run counters."""
        c = self.cfg
        self.wrapped: nn.Module = self.task
        if self.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.task,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=c.find_unused_parameters,
            )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and c.precision == "bf16"
            else nullcontext()
        )
        resume_step = start if self._resumed else None
        self.logger = MetricLogger(self.out_dir, resume_step, tensorboard=c.tensorboard) if self.main else None
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=c.max_steps, initial=start, unit="step", disable=not (c.progress and self.main), dynamic_ncols=True
        )
        self._on_step_end = getattr(self.task, "on_step_end", None)
        self._max_norm = c.grad_clip if c.grad_clip and c.grad_clip > 0 else float("inf")
        self._window, self._window_steps, self._consecutive_bad, self._t_last = {}, 0, 0, time.perf_counter()
        self._healthy_norm, self._saved_step = self._weight_norm(), start

    def _loop(self, batches: Iterator, start: int) -> None:
        c = self.cfg
        evaluated_at = -1
        for step in range(start, c.max_steps):
            stop = self._train_step(batches, step)
            done = self.step
            self.bar.update(1)
            if done % c.log_every == 0 or done == c.max_steps:
                self._log_window(done)
            if c.eval_every > 0 and done % c.eval_every == 0:
                self.evaluate(done, self.logger)
                evaluated_at = done
            self._phase = "save"
            if (c.ckpt_every > 0 and done % c.ckpt_every == 0) or done == c.max_steps or stop:
                self.save(done)
            self._phase = "done"
            if stop:  # one process stops right after the step in which the signal came; ranks agreed on it
                self.interrupted, self.stop_signal = True, self._stop_signal or "SIGTERM"
                written = "checkpoint written" if self._saved_step == done else "no checkpoint (unhealthy run)"
                self._log(
                    f"[unirep] stopped by {self._stop_signal or 'a signal on another rank'} after step {done}; "
                    f"{written}, resume with trainer.resume=auto"
                )
                return
        self._finish(start, evaluated_at)

    def _finish(self, start: int, evaluated_at: int) -> None:
        why = self.health() if self.step > start else None
        if why is not None:
            raise FloatingPointError(
                f"training ended unhealthy at step {self.step} ({why}); no checkpoint was written while unhealthy. The "
                f"last healthy checkpoint is {self.last_checkpoint or 'none of this run'}: resume from it "
                "(trainer.resume=<its folder>) with a lower learning rate or stronger trainer.grad_clip"
            )
        if self.cfg.eval_at_end and evaluated_at != self.step and (self.step > start or not self.last_eval):
            self.evaluate(self.step, self.logger)

    def fit(self) -> dict[str, Any]:
        """Train up to ``max_steps`` (resuming if asked).

        Returns ``{"interrupted", "signal", "step", "eval", "checkpoint", "bad_steps"}``: whether a signal stopped
        the run (and which), the steps done, the last evaluation's metrics, the last checkpoint folder (rank 0) and
        the skipped steps.
        """
        self._phase, self._start, self._saved_step, self.logger, self.bar, batches = None, 0, 0, None, None, None
        self._lock = None
        previous_handlers, threads = self._install_signals(), torch.get_num_threads()
        try:
            self._setup()
            self._start = start = self._resume()
            batches = self._build_loader(start)
            self._start_loop(start)
            if self.cfg.num_threads:
                torch.set_num_threads(self.cfg.num_threads)
            self._loop(batches, start)
        except BaseException as err:
            self._emergency_checkpoint(err)
            raise
        finally:
            self._cleanup(previous_handlers, threads)
            del batches
        return {
            "interrupted": self.interrupted,
            "signal": self.stop_signal,
            "step": self.step,
            "eval": self.last_eval,
            "checkpoint": self.last_checkpoint,
            "bad_steps": self.bad_steps,
        }

    def _cleanup(self, previous_handlers: dict[int, Any], threads: int) -> None:
        torch.set_num_threads(threads)
        for sig, old in previous_handlers.items():
            signal.signal(sig, old)
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
        if self._lock is not None:
            self._lock.release()
