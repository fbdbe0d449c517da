"""Shared set-up of the reliability suite: a tiny toy run in-process, copies of its checkpoints to damage."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from unirep.cli import compose, run_eval, run_sample, run_train
from unirep.train import DataModule, Task, Trainer

# experiment=toy shrunk to a fraction of a second per run (4 steps, checkpoints at 2 and 4)
TOY = [
    "experiment=toy",
    "data.num_train=256",
    "data.num_val=64",
    "task.num_eval=64",
    "task.sample_steps=2",
    "task.model.hidden=16",
    "task.model.depth=2",
    "trainer.batch_size=32",
    "trainer.max_steps=4",
    "trainer.warmup_steps=2",
    "trainer.log_every=2",
    "trainer.ckpt_every=2",
    "trainer.keep_last=3",
    "trainer.tensorboard=false",
    "trainer.progress=false",
    "trainer.eval_at_end=false",
    "trainer.num_threads=1",
]


def toy_cfg(out_dir: Path, *extra: str):
    return compose("train", [*TOY, f"out_dir={out_dir}", *extra])


def train(out_dir: Path, *extra: str) -> dict:
    return run_train(toy_cfg(out_dir, *extra))


def sample(checkpoint: Path, out_dir: Path, *extra: str) -> dict:
    return run_sample(
        compose("sample", [f"checkpoint={checkpoint}", "num=8", "device=cpu", f"out_dir={out_dir}", *extra])
    )


def evaluate(checkpoint: Path, out_dir: Path, *extra: str) -> dict:
    return run_eval(compose("eval", [f"checkpoint={checkpoint}", "device=cpu", f"out_dir={out_dir}", *extra]))


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """One finished toy run (checkpoints step 2 and 4); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("toy") / "run"
    train(out)
    return out


@pytest.fixture
def run_copy(toy_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(toy_run, dst)
    lock = dst / ".unirep.lock"
    if lock.exists():
        lock.unlink()
    return dst


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


class Regression(Task):
    """A tiny task for trainer-level cases; ``hook(step, task)`` runs after each applied step."""

    def __init__(self, hook=None) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 1))
        self.hook = hook

    def forward(self, batch, step):
        x, y = batch
        return {"loss": (self.model(x + 0.01 * torch.randn_like(x)) - y).square().mean()}

    def on_step_end(self, step):
        if self.hook is not None:
            self.hook(step, self)


def regression_data() -> DataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    return DataModule(train=TensorDataset(x, x.sum(1, keepdim=True)))


def regression_trainer(task: Task, out_dir: Path, **kw) -> Trainer:
    args = dict(
        max_steps=8, batch_size=8, ckpt_every=2, keep_last=3, log_every=2, precision="fp32", device="cpu",
        progress=False, tensorboard=False, num_threads=1, warmup_steps=2, lr_schedule="cosine",
    )  # fmt: skip
    args.update(kw)
    return Trainer(task, regression_data(), functools.partial(torch.optim.AdamW, lr=1e-2), out_dir=out_dir, **args)


def flat_state(trainer: Trainer) -> torch.Tensor:
    parts = [v.flatten().float() for v in trainer.task.state_dict().values()]
    parts += [v.flatten().float() for v in trainer.ema.state_dict().values()]
    return torch.cat(parts)
