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

import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from unirep.train import distributed as dist_utils
from unirep.train.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint
from unirep.train.data import DataModule, ResumableBatchSampler, to_device
from unirep.train.ema import EMA
from unirep.train.logging import MetricLogger

__all__ = ["Trainer", "seed_everything", "lr_factor"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(
    step: int, max_steps: int, warmup_steps: int = 0, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier of the optimiser step ``step`` (0-based): linear warm-up to 1, then the schedule.

    ``"constant"``: 1. ``"cosine"``: from 1 down to ``min_ratio`` at ``max_steps`` (half a cosine period).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"trainer.lr_schedule={schedule!r}: use 'constant' or 'cosine'")


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


class Trainer:
    """Train a :class:`~unirep.train.Task` on a :class:`~unirep.train.DataModule`.

    Args:
        task: the task (a module whose ``forward(batch, step)`` returns ``{"loss": ..., ...}`` and with ``.model``).
        data: data sets; the trainer builds the loader.
        optimizer: a callable taking the trainable parameters (hydra ``_partial_: true`` AdamW), or a built optimiser.
        max_steps: optimiser steps in total (a resumed run continues up to it).
        batch_size: global batch per optimiser step (split over ranks and accumulation steps).
        scheduler: optional callable taking the optimiser and returning an LR scheduler stepped once per step;
            default: warm-up + ``lr_schedule`` through ``LambdaLR``.
        grad_clip: max total gradient norm (0 or less: no clipping; the norm is still logged).
        ema_decay: EMA decay of ``task.model`` (REPA/DiT: 0.9999).
        log_every, eval_every, ckpt_every: intervals in steps (0 disables periodic eval/checkpoints; a checkpoint and,
            with ``eval_at_end``, an evaluation always follow the last step).
        keep_last: checkpoints to keep.
        num_workers: data-loader worker processes.
        accum_steps: micro-batches per step.
        precision: ``"bf16"`` (autocast on CUDA; CPU always runs float32) or ``"fp32"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        resume: ``"auto"`` (newest checkpoint in ``out_dir/checkpoints`` if any), ``"none"`` or a checkpoint path.
        warmup_steps, lr_schedule, min_lr_ratio: the default schedule (see :func:`lr_factor`).
        max_bad_steps: consecutive non-finite steps tolerated before stopping.
        seed: seeds generators and the data order.
        out_dir: where metrics, TensorBoard logs, checkpoints and evaluation outputs go.
        config: the resolved run config stored in checkpoints (what :func:`~unirep.train.load_task` rebuilds from).
        progress: show a tqdm bar (rank 0).
        tensorboard: write TensorBoard events under ``out_dir/tb``.
        eval_at_end: run ``task.evaluate`` after the last step.
        find_unused_parameters: passed to DistributedDataParallel (tasks whose graph skips parameters on some steps).
        num_threads: CPU threads of torch's intra-op pool during fit (0: leave as is). Tiny models on a shared CPU
            run many times faster on 1 thread than on contended threads (the toy demo: ~100 vs ~6 steps/s).
        handle_signals: on SIGTERM or SIGUSR1 (a cluster's pre-emption notice) finish the current step, write a
            checkpoint and return with ``interrupted=True``, so ``trainer.resume=auto`` continues exactly.
    """

    def __init__(
        self,
        task: nn.Module,
        data: DataModule,
        optimizer: OptimizerFactory | torch.optim.Optimizer,
        *,
        max_steps: int,
        batch_size: int,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        grad_clip: float = 1.0,
        ema_decay: float = 0.9999,
        log_every: int = 50,
        eval_every: int = 0,
        ckpt_every: int = 1000,
        keep_last: int = 3,
        num_workers: int = 0,
        accum_steps: int = 1,
        precision: str = "bf16",
        device: str = "auto",
        resume: str = "auto",
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        max_bad_steps: int = 10,
        seed: int = 0,
        out_dir: str | Path = "outputs/run",
        config: dict[str, Any] | None = None,
        progress: bool = True,
        tensorboard: bool = True,
        eval_at_end: bool = True,
        find_unused_parameters: bool = False,
        handle_signals: bool = True,
        num_threads: int = 0,
    ) -> None:
        if not isinstance(task, nn.Module) or not isinstance(getattr(task, "model", None), nn.Module):
            raise TypeError(f"Trainer: task must be an nn.Module with a .model submodule, got {type(task).__name__}")
        if max_steps < 0 or log_every <= 0 or accum_steps <= 0 or max_bad_steps <= 0:
            raise ValueError(
                f"Trainer: need max_steps >= 0, log_every > 0, accum_steps > 0, max_bad_steps > 0; got {max_steps}, "
                f"{log_every}, {accum_steps}, {max_bad_steps}"
            )
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.precision={precision!r}: use 'bf16' or 'fp32'")
        lr_factor(0, max(1, max_steps), warmup_steps, lr_schedule, min_lr_ratio)  # validates the schedule name
        self.task, self.data, self.optimizer_spec, self.scheduler_spec = task, data, optimizer, scheduler
        self.max_steps, self.batch_size = max_steps, batch_size
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        self.log_every, self.eval_every, self.ckpt_every, self.keep_last = log_every, eval_every, ckpt_every, keep_last
        self.num_workers, self.accum_steps, self.precision, self.device_name = (
            num_workers,
            accum_steps,
            precision,
            device,
        )
        self.resume = str(resume)
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        self.max_bad_steps, self.seed, self.out_dir, self.config = max_bad_steps, seed, Path(out_dir), config
        self.progress, self.tensorboard, self.eval_at_end = progress, tensorboard, eval_at_end
        self.find_unused_parameters = find_unused_parameters
        self.step = 0
        self.bad_steps = 0  # total skipped steps
        self.ema: EMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.last_eval: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self._steps_per_epoch = max(1, len(data.train) // max(1, batch_size))
        self.handle_signals = handle_signals
        if num_threads < 0:
            raise ValueError(f"trainer.num_threads={num_threads}: use 0 (torch's default) or a positive count")
        self.num_threads = num_threads
        self._stop_signal: str | None = None
        self.interrupted = False

    # -- pieces --------------------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        if self.resume in ("none", "None", "null", "false", "False", ""):
            return None
        if self.resume == "auto":
            return find_checkpoint(self.out_dir / "checkpoints")
        found = find_checkpoint(self.resume)
        if found is None:
            raise FileNotFoundError(
                f"trainer.resume={self.resume}: no checkpoint there (expected a step_N folder with state.json or a run "
                "folder); use trainer.resume=auto or none"
            )
        return found

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if isinstance(self.optimizer_spec, torch.optim.Optimizer):
            return self.optimizer_spec
        opt = self.optimizer_spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: the factory returned {type(opt).__name__}; use a torch optimizer with _partial_: true"
            )
        return opt

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        if self.scheduler_spec is not None:
            return self.scheduler_spec(optimizer)
        max_steps, warm, sched, min_ratio = self.max_steps, self.warmup_steps, self.lr_schedule, self.min_lr_ratio
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, max_steps, warm, sched, min_ratio))

    def _rng_all_ranks(self) -> list:
        return dist_utils.all_gather_object(rng_state())

    def save(self, step: int) -> Path | None:
        """Write a checkpoint (rank 0); every rank takes part because the RNG states of all ranks are gathered."""
        rng = self._rng_all_ranks()
        path = None
        if dist_utils.is_main():
            extra = {
                "bad_steps": self.bad_steps,
                # the data position is a function of (seed, step, batch_size): recorded here for reading and checks
                "data": {
                    "seed": self.seed,
                    "batch_size": self.batch_size,
                    "world_size": dist_utils.world_size(),
                    "accum_steps": self.accum_steps,
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
                keep_last=self.keep_last,
            )
            self.last_checkpoint = path
        dist_utils.barrier()
        return path

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
        return metrics

    def _install_signals(self) -> dict[int, Any]:
        """Turn SIGTERM/SIGUSR1 into a stop at the end of the current step (main thread only)."""
        self._stop_signal, self.interrupted = None, False
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train up to ``max_steps`` (resuming if asked).

        Returns ``{"interrupted", "step", "eval", "checkpoint", "bad_steps"}``: whether a signal stopped the run, the
        steps done, the last evaluation's metrics, the last checkpoint folder (rank 0) and the skipped steps.
        """
        device = dist_utils.init_distributed(self.device_name)
        rank, world = dist_utils.rank(), dist_utils.world_size()
        main = rank == 0
        task = self.task.to(device)
        task.train()
        params = [p for p in task.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"{type(task).__name__} has no trainable parameters (requires_grad=True): nothing to train"
            )
        self.optimizer = optimizer = self._build_optimizer(params)
        self.scheduler = scheduler = self._build_scheduler(optimizer)
        self.ema = ema = EMA(task.model, self.ema_decay)

        resume_from = self._resume_path()
        start = 0
        if resume_from is not None:
            state = load_checkpoint(resume_from, task, ema, optimizer, scheduler, restore_rng=True, rank=rank)
            start = int(state["step"])
            extra = state.get("extra", {})
            self.bad_steps = int(extra.get("bad_steps", 0))
            saved = extra.get("data", {})
            if saved and (saved.get("batch_size"), saved.get("seed")) != (self.batch_size, self.seed):
                warnings.warn(
                    f"resuming {resume_from} with batch_size/seed {self.batch_size}/{self.seed} instead of "
                    f"{saved.get('batch_size')}/{saved.get('seed')}: the data order will differ from the original run",
                    stacklevel=2,
                )
            if main:
                print(f"[unirep] resumed from {resume_from} at step {start}", flush=True)
        else:
            seed_everything(self.seed + rank)
        self.step = start

        wrapped: nn.Module = task
        if world > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                task,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
            )
        sampler = ResumableBatchSampler(
            len(self.data.train), self.batch_size, self.seed, start, rank, world, self.accum_steps
        )
        self._steps_per_epoch = sampler.steps_per_epoch
        loader = DataLoader(
            self.data.train,
            batch_sampler=sampler,
            collate_fn=self.data.collate_fn,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            # the loader draws its worker base seed from this generator, not from the global one, which would
            # otherwise shift the task's random stream on every (re)start
            generator=torch.Generator().manual_seed(self.seed + 1_000_003 * start),
        )
        batches = iter(loader)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and self.precision == "bf16"
            else nullcontext()
        )
        logger = (
            MetricLogger(self.out_dir, resume_step=start if resume_from else None, tensorboard=self.tensorboard)
            if main
            else None
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.max_steps, initial=start, unit="step", disable=not (self.progress and main), dynamic_ncols=True
        )
        on_step_end = getattr(task, "on_step_end", None)
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        window: dict[str, torch.Tensor] = {}
        window_steps, consecutive_bad, t_last, evaluated_at = 0, 0, time.perf_counter(), -1
        previous_handlers = self._install_signals()
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            for step in range(start, self.max_steps):
                sums: dict[str, torch.Tensor] = {}
                for micro in range(self.accum_steps):
                    batch = to_device(next(batches), device)
                    last = micro == self.accum_steps - 1
                    sync = wrapped.no_sync() if (world > 1 and not last) else nullcontext()
                    with sync:
                        with autocast:
                            out = wrapped(batch, step)
                        if "loss" not in out:
                            raise KeyError(
                                f"{type(task).__name__}.forward must return a dict with 'loss'; got {list(out)}"
                            )
                        (out["loss"].float() / self.accum_steps).backward()
                    for k, v in out.items():
                        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
                        if v.numel() != 1:
                            raise ValueError(
                                f"{type(task).__name__}.forward returned {k!r} with shape {tuple(v.shape)}: every "
                                "entry must be a scalar (reduce it, e.g. .mean(), before returning)"
                            )
                        sums[k] = sums.get(k, 0) + v.reshape(()) / self.accum_steps
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                ok = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
                if world > 1:  # every rank must take the same decisions: [apply this step, keep running]
                    flags = torch.stack([ok.float(), torch.tensor(float(not self._stop_signal))]).to(device)
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
                    ok, stop_all = flags[0] > 0, bool(flags[1] == 0)
                if bool(ok):
                    optimizer.step()
                    ema.update(task.model)
                    consecutive_bad = 0
                    if on_step_end is not None:
                        on_step_end(step)
                    for k, v in sums.items():
                        window[k] = window.get(k, 0) + v
                    window["grad_norm"] = window.get("grad_norm", 0) + grad_norm.detach().float()
                    window_steps += 1
                else:
                    self.bad_steps += 1
                    consecutive_bad += 1
                    if main:
                        print(
                            f"[unirep] step {step}: non-finite loss/gradient (loss={float(sums['loss']):.4g}, "
                            f"grad_norm={float(grad_norm):.4g}); update skipped ({consecutive_bad} in a row)",
                            flush=True,
                        )
                    if consecutive_bad >= self.max_bad_steps:
                        raise FloatingPointError(
                            f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step "
                            f"{step}, trainer.max_bad_steps={self.max_bad_steps}): lower the learning rate, enable "
                            "trainer.grad_clip, use trainer.precision=fp32, or check the data for NaN/inf"
                        )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                done = step + 1
                self.step = done
                bar.update(1)

                if done % self.log_every == 0 or done == self.max_steps:
                    now = time.perf_counter()
                    keys = sorted(window)
                    vals = torch.stack([window[k].to(device) / max(1, window_steps) for k in keys]) if keys else None
                    if vals is not None:
                        vals = dist_utils.all_reduce_mean(vals).cpu()
                    if main:
                        row = dict(zip(keys, vals.tolist(), strict=True)) if vals is not None else {}
                        row.update(
                            lr=optimizer.param_groups[0]["lr"],
                            bad_steps=self.bad_steps,
                            steps_per_sec=window_steps / max(now - t_last, 1e-9) if window_steps else 0.0,
                            epoch=step // sampler.steps_per_epoch,
                        )
                        logger.log(done, row)
                        if "loss" in row:
                            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}")
                    window, window_steps, t_last = {}, 0, now
                if self.eval_every and self.eval_every > 0 and done % self.eval_every == 0:
                    self.evaluate(done, logger)
                    evaluated_at = done
                # one process stops right after the step in which the signal came; ranks agree on the flag above
                stop = stop_all if world > 1 else self._stop_signal is not None
                if (self.ckpt_every and self.ckpt_every > 0 and done % self.ckpt_every == 0) or done == self.max_steps:
                    self.save(done)
                elif stop:
                    self.save(done)
                if stop:
                    self.interrupted = True
                    if main:
                        print(
                            f"[unirep] stopped by {self._stop_signal or 'a signal on another rank'} after step {done}; "
                            f"checkpoint written, resume with trainer.resume=auto",
                            flush=True,
                        )
                    break
            if (
                not self.interrupted
                and self.eval_at_end
                and evaluated_at != self.step
                and (self.step > start or not self.last_eval)
            ):
                self.evaluate(self.step, logger)
        finally:
            torch.set_num_threads(threads)
            self._restore_signals(previous_handlers)
            bar.close()
            if logger is not None:
                logger.close()
            del batches
        return {
            "interrupted": self.interrupted,
            "step": self.step,
            "eval": self.last_eval,
            "checkpoint": self.last_checkpoint,
            "bad_steps": self.bad_steps,
        }
