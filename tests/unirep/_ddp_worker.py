"""Helper for test_ddp.py (not collected by pytest): train a tiny deterministic task, single-process or under torchrun.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _ddp_worker.py OUT_DIR ACCUM_STEPS``.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from unirep.train import DataModule, Task, Trainer
from unirep.train.distributed import shutdown

torch.set_num_threads(1)


class Regression(Task):
    """Deterministic MSE regression: with no randomness in the step, DDP must reproduce one process exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, batch, step):
        x, y = batch
        return {"loss": (self.model(x).squeeze(-1) - y).square().mean()}


def data() -> DataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    return DataModule(train=TensorDataset(x, torch.sin(x.sum(1))))


def run(out_dir: str, accum_steps: int) -> dict:
    torch.manual_seed(0)
    trainer = Trainer(
        Regression(),
        data(),
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01),
        max_steps=6,  # 40 items / 8 per step: crosses an epoch boundary
        batch_size=8,
        accum_steps=accum_steps,
        grad_clip=0.5,
        ema_decay=0.5,
        log_every=2,
        ckpt_every=3,
        keep_last=3,
        warmup_steps=2,
        lr_schedule="cosine",
        precision="fp32",
        device="cpu",
        resume="none",
        out_dir=out_dir,
        progress=False,
        tensorboard=False,
    )
    try:
        return trainer.fit()
    finally:
        shutdown()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
