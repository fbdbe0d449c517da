"""Geometry sampling and the data sets made on first use.

Samplers: random Gaussian displacements, normal-mode thermal sampling (a finite-difference Hessian) and short
Langevin MD with any ASE calculator, as rMD17-style narrow sets are made. No data can be downloaded here, so the
MACE recipes make what they need when it is missing:

- :func:`ensure_md_set`: a narrow rMD17-style MD set of one molecule (GFN2-xTB Langevin MD via ``tblite``);
- :func:`ensure_broad_set`: a broad pre-training set over small organic molecules (QM9 from ``qm9pack`` when it
  is installed, else rdkit-made conformers), with the narrow-set molecules held out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .labelling import label_structures, resolve_calculator
from .readers import structures_from_smiles, write_extxyz
from .structure import Structure

__all__ = [
    "thermal_displacements",
    "normal_mode_samples",
    "langevin_md",
    "NARROW",
    "FALLBACK_SMILES",
    "ensure_md_set",
    "qm9_structures",
    "broad_structures",
    "ensure_broad_set",
    "generate_set",
]


def thermal_displacements(
    structure: Structure, num: int, sigma: float = 0.05, seed: int = 0, prefix: str | None = None
) -> list[Structure]:
    """Random Gaussian displacements of every coordinate (std ``sigma`` Å); unlabelled copies."""
    rng = np.random.default_rng(seed)
    prefix = prefix or structure.id or "struct"
    return [
        replace(
            structure,
            positions=structure.positions + rng.normal(0, sigma, structure.positions.shape),
            energy=None,
            forces=None,
            id=f"{prefix}/disp{k}",
            source=f"{structure.source}+disp{k}",
        )
        for k in range(num)
    ]


def normal_mode_samples(
    structure: Structure,
    num: int,
    temperature: float = 300.0,
    calculator: Any = "gfn2",
    seed: int = 0,
    delta: float = 0.005,
    prefix: str | None = None,
) -> list[Structure]:
    """Normal-mode sampling: a finite-difference Hessian from ``calculator`` at ``structure`` (ideally a
    minimum), then each mode's amplitude drawn so its harmonic energy is thermal: ``q_k ~ N(0, kT / w_k^2)``
    in mass-weighted coordinates (translations, rotations and imaginary modes skipped)."""
    from ase.data import atomic_masses
    from ase.units import kB

    calc = resolve_calculator(calculator)
    atoms = structure.to_atoms()
    atoms.calc = calc
    n = len(structure)
    x0 = structure.positions.copy()
    hess = np.zeros((3 * n, 3 * n))
    for a in range(n):
        for c in range(3):
            fs = []
            for sgn in (1, -1):
                x = x0.copy()
                x[a, c] += sgn * delta
                atoms.set_positions(x)
                fs.append(atoms.get_forces().reshape(-1))
            hess[3 * a + c] = -(fs[0] - fs[1]) / (2 * delta)  # d2E/dx2 = -dF/dx
    hess = 0.5 * (hess + hess.T)
    m = np.repeat(atomic_masses[structure.numbers], 3)
    w2, modes = np.linalg.eigh(hess / np.sqrt(m[:, None] * m[None, :]))  # eV / (Å^2 amu)
    keep = w2 > 1e-3 * max(w2.max(), 1e-12)  # drops the 6 near-zero rigid-body modes and imaginary ones
    rng = np.random.default_rng(seed)
    prefix = prefix or structure.id or "struct"
    out = []
    for k in range(num):
        q = rng.normal(0.0, 1.0, keep.sum()) * np.sqrt(kB * temperature / w2[keep])
        dx = (modes[:, keep] @ q) / np.sqrt(m)
        out.append(
            replace(
                structure,
                positions=x0 + dx.reshape(n, 3),
                energy=None,
                forces=None,
                id=f"{prefix}/nm{k}",
                source=f"{structure.source}+nm{k}",
            )
        )
    return out


def langevin_md(
    structure: Structure,
    num: int,
    calculator: Any = "gfn2",
    temperature: float = 500.0,
    timestep_fs: float = 0.5,
    friction: float = 0.02,
    interval: int = 10,
    seed: int = 0,
    prefix: str | None = None,
) -> list[Structure]:
    """Short Langevin MD with ``calculator``; every ``interval`` steps a labelled frame is kept (rMD17-style)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = structure.to_atoms()
    atoms.calc = resolve_calculator(calculator)
    rng = np.random.RandomState(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng, fixcm=False
    )
    prefix = prefix or structure.id or "struct"
    out = []
    for k in range(num):
        dyn.run(interval)
        out.append(
            replace(
                structure,
                positions=atoms.get_positions().copy(),
                energy=float(atoms.get_potential_energy()),
                forces=atoms.get_forces().copy(),
                id=f"{prefix}/md{k}",
                source=f"{structure.source}+md{k}",
            )
        )
    return out


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
    print(f"[molecular.data] {msg}", flush=True)


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
    """Write the broad set (:func:`broad_structures`) to ``path`` unless it exists."""
    path = Path(path)
    if path.exists():
        return path
    t0 = time.time()
    _log(f"{path} missing: labelling {num_molecules} molecules x {displacements + 1} geometries with {calculator} ...")
    frames, origin = broad_structures(num_molecules, displacements, seed, calculator)
    write_extxyz(frames, path)
    _log(f"wrote {len(frames)} structures ({origin}) to {path} in {time.time() - t0:.0f} s")
    return path


def generate_set(path: str | Path, kind: str = "md", **kwargs: Any) -> Path:
    """Make a missing labelled file: ``kind="md"`` (:func:`ensure_md_set`, one molecule's Langevin MD) or
    ``kind="broad"`` (:func:`ensure_broad_set`, many small molecules); ``kwargs`` go to that function."""
    if kind not in ("md", "broad"):
        raise ValueError(f"data.generate.kind={kind!r}: use 'md' (one molecule's MD) or 'broad' (many molecules)")
    return (ensure_md_set if kind == "md" else ensure_broad_set)(path, **kwargs)
