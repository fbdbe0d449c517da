"""Self-contained molecular quick start: data made on first use, and the project's own pre-trained teacher.

No weights or data can be downloaded here, so the MACE-REPA quick start makes what it needs when missing:

- :func:`ensure_md_set`: a narrow rMD17-style MD set of one molecule (GFN2-xTB Langevin MD via ``tblite``);
- :func:`ensure_broad_set`: a broad pre-training set over small organic molecules (QM9 from ``qm9pack`` when it
  is installed, else rdkit-made conformers), with the narrow-set molecules held out;
- :func:`foundation_teacher`: a small "foundation" MACE pre-trained on the broad set (a few minutes on CPU) and
  saved in the project's MACE format; later runs load it. A larger one trained with
  ``unirep-train experiment=molecular/foundation`` loads through the same :func:`molecular.teachers.mace_teacher`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from molecular.data import (
    AtomsDataset,
    Structure,
    collate_graphs,
    label_structures,
    langevin_md,
    read_structures,
    structures_from_smiles,
    thermal_displacements,
    write_extxyz,
)
from molecular.models import MACEModel
from molecular.teachers.mace import mace_teacher, random_mace_teacher, save_mace_model
from unirep.encoders import FrozenEncoder

__all__ = ["NARROW", "FALLBACK_SMILES", "ensure_md_set", "ensure_broad_set", "pretrain_mace", "foundation_teacher"]

NARROW = {  # rMD17's molecules, as SMILES
    "ethanol": "CCO",
    "malonaldehyde": "O=CCC=O",
    "benzene": "c1ccccc1",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
}

# the broad set without qm9pack: small H/C/N/O/F molecules, QM9-like
FALLBACK_SMILES = [
    "C",
    "N",
    "O",
    "CC",
    "CN",
    "CO",
    "CF",
    "C=C",
    "C#C",
    "C=O",
    "C#N",
    "CCC",
    "CCN",
    "CC=O",
    "CC#N",
    "COC",
    "CC(C)C",
    "CC(C)O",
    "CC(=O)O",
    "CC(=O)N",
    "NC=O",
    "OC=O",
    "C1CC1",
    "C1CO1",
    "C1CN1",
    "C1CCC1",
    "C1CCO1",
    "CCCC",
    "CCCO",
    "CCCN",
    "CCOC",
    "CC(C)=O",
    "CC=CC",
    "C=CC=C",
    "C=CC#N",
    "CC#CC",
    "OCCO",
    "NCCO",
    "NCCN",
    "CC(N)C",
    "CC(O)C=O",
    "O=CC=O",
    "CCC=O",
    "CCC#N",
    "FC(F)F",
    "CC(F)F",
    "OC(F)C",
    "c1ccoc1",
    "c1cc[nH]c1",
    "c1ccncc1",
    "c1cnccn1",
    "c1cncnc1",
    "C1CCCC1",
    "C1CCOC1",
    "C1CCNC1",
    "CC1CC1",
    "CCCCC",
    "CCCCO",
    "CC(C)CO",
    "CC(C)(C)O",
    "CN(C)C",
    "CNC=O",
    "CN(C)C=O",
    "COC=O",
    "CCOC=O",
    "NC(=O)N",
    "CC(=N)N",
    "N#CC#N",
    "OC1CC1",
    "C1=CCC=C1",
    "C1=CC=CC1",
    "O=C1CCC1",
    "O=C1CCO1",
    "CC(=O)C=C",
    "C=CC=O",
    "C=CCO",
    "C=CCN",
    "CC=NO",
]


def _log(msg: str) -> None:
    print(f"[molecular.quickstart] {msg}", flush=True)


def ensure_md_set(
    path: str | Path,
    molecule: str = "ethanol",
    frames: int = 200,
    interval: int = 10,
    temperature: float = 500.0,
    seed: int = 0,
    calculator: str = "gfn2",
) -> Path:
    """Write a GFN2-xTB Langevin-MD set of ``molecule`` to ``path`` unless it exists."""
    path = Path(path)
    if path.exists():
        return path
    if molecule not in NARROW:
        raise ValueError(f"molecule {molecule!r}: use one of {sorted(NARROW)}")
    t0 = time.time()
    _log(f"{path} missing: running {frames * interval} steps of {calculator} Langevin MD of {molecule} ...")
    start = structures_from_smiles([NARROW[molecule]], num_confs=1, seed=seed, names=[molecule])[0]
    out = langevin_md(
        start,
        frames,
        calculator=calculator,
        temperature=temperature,
        timestep_fs=0.5,
        interval=interval,
        seed=seed,
        prefix=molecule,
    )
    write_extxyz(out, path)
    _log(f"wrote {len(out)} frames to {path} in {time.time() - t0:.0f} s")
    return path


def qm9_structures(num: int, seed: int, exclude: Sequence[str] = ()) -> list[Structure] | None:
    """``num`` QM9 molecules (reference geometries) from the ``qm9pack`` wheel, or ``None`` without it."""
    try:
        import qm9pack
    except ImportError:
        return None
    import ast
    import os

    import numpy as np
    import pandas as pd
    from ase.data import atomic_numbers
    from rdkit import Chem

    skip = {Chem.CanonSmiles(s) for s in exclude}
    folder = os.path.join(os.path.dirname(qm9pack.__file__), "data")
    df = pd.read_csv(os.path.join(folder, "qm9_part1.csv"), usecols=["Index", "SMILES", "Elements", "XYZ_Ang"])
    out: list[Structure] = []
    for k in np.random.default_rng(seed).permutation(len(df)):
        row = df.iloc[int(k)]
        mol = Chem.MolFromSmiles(row["SMILES"])
        if mol is None or Chem.MolToSmiles(mol) in skip:
            continue
        numbers = [atomic_numbers[e] for e in ast.literal_eval(row["Elements"])]
        pos = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
        out.append(Structure(numbers, pos, id=f"qm9/{int(row['Index'])}", source=f"qm9pack:{int(row['Index'])}"))
        if len(out) >= num:
            break
    return out


def broad_structures(
    num_molecules: int, displacements: int, seed: int, calculator: str = "gfn2"
) -> tuple[list[Structure], str]:
    """The broad set: molecules (narrow-set molecules held out) plus thermal displacements, labelled."""
    from rdkit import Chem

    base = qm9_structures(num_molecules, seed, exclude=list(NARROW.values()))
    origin = "qm9pack"
    if base is None:
        origin = "rdkit-enumerated"
        held_out = {Chem.CanonSmiles(s) for s in NARROW.values()}
        smiles = [s for s in FALLBACK_SMILES if Chem.CanonSmiles(s) not in held_out][:num_molecules]
        base = structures_from_smiles(smiles, num_confs=1, seed=seed, names=[f"mol{k}" for k in range(len(smiles))])
    frames: list[Structure] = []
    for k, s in enumerate(base):
        frames.append(s)
        frames.extend(thermal_displacements(s, displacements, sigma=0.04, seed=seed + k, prefix=s.id))
    return label_structures(frames, calculator), origin


def ensure_broad_set(
    path: str | Path, num_molecules: int = 300, displacements: int = 1, seed: int = 0, calculator: str = "gfn2"
) -> Path:
    path = Path(path)
    if path.exists():
        return path
    t0 = time.time()
    _log(f"{path} missing: labelling {num_molecules} molecules x {displacements + 1} geometries with {calculator} ...")
    frames, origin = broad_structures(num_molecules, displacements, seed, calculator)
    write_extxyz(frames, path)
    _log(f"wrote {len(frames)} structures ({origin}) to {path} in {time.time() - t0:.0f} s")
    return path


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
    from molecular.task import MaceTask

    torch.manual_seed(seed)
    model = MACEModel(z_table, **model_kwargs)
    task = MaceTask(model, energy_weight=energy_weight, forces_weight=forces_weight, statistics_from=str(train))
    ds = AtomsDataset(read_structures(train), r_max=model.r_max, z_table=z_table, require_labels=True)
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
