"""The MACE-REPA quick start's teacher: the project's own pre-trained "foundation" MACE, made on first use.

No weights can be downloaded here, so :func:`foundation_teacher` pre-trains a small MACE on the broad set
(:func:`molecular.data.ensure_broad_set`, made first when missing) in a few minutes on CPU and saves it in the
project's MACE format; later runs load it. A larger one trained with ``unirep-train experiment=molecular/foundation``
loads through the same :func:`molecular.teachers.mace_teacher`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from molecular.data import AtomsDataset, collate_graphs, ensure_broad_set, read_structures
from molecular.models import MACEModel
from molecular.task import MaceTask
from molecular.teachers.mace import mace_teacher, random_mace_teacher, save_mace_model
from unirep.encoders import FrozenEncoder

__all__ = ["pretrain_mace", "foundation_teacher"]


def _log(msg: str) -> None:
    print(f"[molecular.quickstart] {msg}", flush=True)


def pretrain_mace(
    train: str | Path,
    z_table: Sequence[int],
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 0.01,
    seed: int = 0,
    energy_weight: float = 1.0,
    forces_weight: float = 100.0,
    **model_kwargs,
) -> MACEModel:
    """A compact pre-training loop (Adam with amsgrad, MACE's defaults; EMA 0.99) for the quick-start teacher.

    The full recipe runs through the trainer: ``unirep-train experiment=molecular/foundation``.
    """
    torch.manual_seed(seed)
    model = MACEModel(z_table, **model_kwargs)
    ds = AtomsDataset(read_structures(train), r_max=model.r_max, z_table=z_table, require_labels=True)
    task = MaceTask(model, energy_weight=energy_weight, forces_weight=forces_weight, statistics_from=ds)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    t0 = time.time()
    step, epoch = 0, 0
    while step < steps:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        epoch += 1
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = collate_graphs([ds[i] for i in order[start : start + batch_size]])
            out = task(batch, step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # EMA of the weights, MACE's default decay 0.99
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(0.99).add_(v.detach(), alpha=0.01)
                    else:
                        ema[k].copy_(v)
            step += 1
            if step % 100 == 0 or step == steps:
                _log(
                    f"teacher pre-training step {step}/{steps}: force MAE "
                    f"{float(out['mae/forces']) * 1e3:.0f} meV/Å ({time.time() - t0:.0f} s)"
                )
            if step >= steps:
                break
    model.load_state_dict(ema)
    return model.eval()


def foundation_teacher(
    path: str,
    train: str = "data/molecular/broad_quick.extxyz",
    layers: Sequence[int] = (-1,),
    invariant: bool = True,
    cache_dir: str | None = "data/cache/molecular/teacher",
    z_table: Sequence[int] = (1, 6, 7, 8, 9),
    steps: int = 600,
    num_molecules: int = 300,
    seed: int = 0,
    model: dict | None = None,
    random_init: bool = False,
) -> FrozenEncoder:
    """The project's own pre-trained MACE as a frozen teacher (hydra target).

    ``path`` is a saved MACE (project format folder, or a unirep checkpoint folder of the foundation recipe).
    When it is missing, the broad set ``train`` is made if needed and a small MACE is pre-trained on it for
    ``steps`` steps and saved at ``path``. ``random_init=True`` gives a tiny random teacher instead (smoke runs).
    """
    if random_init:
        return random_mace_teacher(z_table, layers=layers, cache_dir=None)
    folder = Path(path)
    if not folder.exists():
        ensure_broad_set(train, num_molecules=num_molecules, seed=seed)
        kwargs = dict(
            r_max=5.0, num_channels=32, max_L=1, num_interactions=2, max_ell=3, correlation=3, radial_mlp=(32, 32)
        )
        kwargs.update(model or {})
        _log(f"{folder} missing: pre-training the foundation teacher on {train} ({steps} steps) ...")
        trained = pretrain_mace(train, z_table, steps=steps, seed=seed, **kwargs)
        save_mace_model(trained, folder)
        _log(f"saved the foundation teacher to {folder}")
    return mace_teacher(str(folder), layers=layers, invariant=invariant, cache_dir=cache_dir)
