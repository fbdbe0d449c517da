"""Geometry sampling and the data sets made on first use.

Samplers: random Gaussian displacements, normal-mode thermal sampling (a finite-difference Hessian) and short
Langevin MD with any ASE calculator, as rMD17-style narrow sets are made. No data can be downloaded here, so the
MACE recipes make what they need when it is missing:

- :func:`ensure_md_set`: a narrow rMD17-style MD set of one molecule (GFN2-xTB Langevin MD via ``tblite``);
- :func:`ensure_broad_set`: a broad pre-training set over small organic molecules (QM9 from ``qm9pack`` when it
  is installed, else rdkit-made conformers), with the narrow-set molecules held out;
- :func:`ensure_qm9_set`: the foundation set, QM9 molecules x normal-mode geometries (an MMFF94 Hessian, thermal
  amplitudes) labelled with GFN2-xTB, resumable in chunks.

The MD is resumable too: :func:`langevin_md` with ``checkpoint=`` saves positions, momenta, the random state and
the frames so far to one ``.npz`` (written to a temporary name and renamed) every ``checkpoint_every`` frames, and a
rerun continues from there; the trajectory is the same as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .labelling import label_structures, label_to_file, resolve_calculator
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
    "mmff_hessian",
    "qm9_normal_mode_structures",
    "ensure_qm9_set",
    "split_by_molecule",
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


def _fd_hessian(structure: Structure, calculator: Any, delta: float) -> np.ndarray:
    """A central finite-difference Hessian ``[3N, 3N]`` in eV/Å^2 from an ASE calculator's forces."""
    atoms = structure.to_atoms()
    atoms.calc = resolve_calculator(calculator)
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
    return 0.5 * (hess + hess.T)


def mmff_hessian(structure: Structure, delta: float = 0.005) -> np.ndarray | None:
    """The MMFF94 Hessian ``[3N, 3N]`` (eV/Å^2) by central differences of rdkit's analytic gradient, one force field
    per molecule (bonds perceived from the geometry); ``None`` when rdkit cannot type the molecule.

    rdkit's ``CalcGrad(pos)`` alone reuses positions cached by the previous call for some terms (rdkit 2025: a second
    call returns a wrong gradient); ``CalcEnergy(pos)`` first refreshes them. A test pins this against finite
    differences of the calculator."""
    from ase.units import kcal
    from ase.units import mol as mol_unit
    from rdkit.Chem import AllChem

    from .labelling import MMFFCalculator

    try:
        mol = MMFFCalculator()._molecule(structure.to_atoms())
        props = AllChem.MMFFGetMoleculeProperties(mol)
        if props is None:
            return None
        ff = AllChem.MMFFGetMoleculeForceField(mol, props)
    except Exception:  # bond perception fails on unusual valences / charges
        return None

    def grad(x: np.ndarray) -> np.ndarray:
        pos = x.tolist()
        ff.CalcEnergy(pos)
        return np.asarray(ff.CalcGrad(pos))

    x0 = structure.positions.reshape(-1)
    hess = np.zeros((x0.size, x0.size))
    for i in range(x0.size):
        x = x0.copy()
        x[i] += delta
        gp = grad(x)
        x[i] -= 2 * delta
        hess[i] = (gp - grad(x)) / (2 * delta)
    return 0.5 * (hess + hess.T) * (kcal / mol_unit)


def _bond_graph(numbers: np.ndarray, positions: np.ndarray, factor: float = 1.25) -> np.ndarray:
    from ase.data import covalent_radii

    r = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return (d < factor * (r[:, None] + r[None])) & ~np.eye(len(numbers), dtype=bool)


def _sample_modes(
    structure: Structure,
    hess: np.ndarray,
    temperatures: Sequence[float],
    rng: np.random.Generator,
    prefix: str,
    check_bonds: bool = False,
) -> list[Structure]:
    from ase.data import atomic_masses
    from ase.units import kB

    n = len(structure)
    x0 = structure.positions
    m = np.repeat(atomic_masses[structure.numbers], 3)
    w2, modes = np.linalg.eigh(hess / np.sqrt(m[:, None] * m[None, :]))  # eV / (Å^2 amu)
    keep = w2 > 1e-3 * max(w2.max(), 1e-12)  # drops the 6 near-zero rigid-body modes and imaginary ones
    bonds = _bond_graph(structure.numbers, x0) if check_bonds else None
    out = []
    for k, temperature in enumerate(temperatures):
        scale = 1.0
        for attempt in range(8):
            q = rng.normal(0.0, 1.0, keep.sum()) * np.sqrt(kB * temperature / w2[keep]) * scale
            x = x0 + ((modes[:, keep] @ q) / np.sqrt(m)).reshape(n, 3)
            # a soft torsion's harmonic amplitude can break or make bonds: redraw, then shrink the amplitude
            if bonds is None or np.array_equal(_bond_graph(structure.numbers, x), bonds):
                break
            scale = 1.0 if attempt < 3 else 0.6 if attempt < 6 else 0.35
        else:
            continue
        out.append(
            replace(
                structure,
                positions=x,
                energy=None,
                forces=None,
                id=f"{prefix}/nm{k}",
                source=f"{structure.source}+nm{k}@{temperature:g}K",
            )
        )
    return out


def normal_mode_samples(
    structure: Structure,
    num: int,
    temperature: float = 300.0,
    calculator: Any = "gfn2",
    seed: int = 0,
    delta: float = 0.005,
    prefix: str | None = None,
    hessian: np.ndarray | None = None,
) -> list[Structure]:
    """Normal-mode sampling: a finite-difference Hessian from ``calculator`` at ``structure`` (ideally a
    minimum; or a given ``hessian`` in eV/Å^2), then each mode's amplitude drawn so its harmonic energy is thermal:
    ``q_k ~ N(0, kT / w_k^2)`` in mass-weighted coordinates (translations, rotations and imaginary modes skipped)."""
    hess = _fd_hessian(structure, calculator, delta) if hessian is None else hessian
    prefix = prefix or structure.id or "struct"
    return _sample_modes(structure, hess, [temperature] * num, np.random.default_rng(seed), prefix)


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
    equilibration_steps: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: bool = False,
) -> list[Structure]:
    """Langevin MD with ``calculator`` (ASE's Langevin, ``friction`` in 1/fs); after ``equilibration_steps``
    discarded steps, every ``interval`` steps a labelled frame is kept (rMD17-style), ``num`` frames.

    ``checkpoint`` (a ``.npz`` path) makes the run resumable: the state is saved every ``checkpoint_every`` frames
    and a rerun with the same arguments continues from it (a different set of arguments refuses to resume)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tqdm.auto import tqdm

    atoms = structure.to_atoms()
    atoms.calc = resolve_calculator(calculator)
    rng = np.random.RandomState(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng, fixcm=False
    )
    prefix = prefix or structure.id or "struct"
    n = len(structure)
    calc_name = calculator if isinstance(calculator, str) else "calculator object"  # an object's repr has no identity
    key = json.dumps(
        [structure.numbers.tolist(), np.round(structure.positions, 6).tolist(), calc_name, temperature]
        + [timestep_fs, friction, interval, seed, equilibration_steps]
    )
    key = hashlib.sha1(key.encode()).hexdigest()[:16]
    pos = np.zeros((num, n, 3))
    energy = np.zeros(num)
    forces = np.zeros((num, n, 3))
    done, equilibrated = 0, False
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        st = np.load(ckpt, allow_pickle=False)
        if str(st["key"]) != key:
            raise ValueError(f"{ckpt}: an MD checkpoint of other settings; delete it or choose another path")
        done = min(int(st["done"]), num)
        pos[:done], energy[:done], forces[:done] = st["pos"][:done], st["energy"][:done], st["forces"][:done]
        atoms.set_positions(st["x"])
        atoms.set_momenta(st["p"])
        rng.set_state(("MT19937", st["rng_keys"], int(st["rng_pos"]), int(st["rng_gauss"]), float(st["rng_cached"])))
        equilibrated = True
    if not equilibrated and equilibration_steps > 0:
        dyn.run(equilibration_steps)

    def save(k: int) -> None:
        _, keys, p, has_gauss, cached = rng.get_state()
        tmp = ckpt.with_name(ckpt.name + f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            key=key,
            done=k,
            pos=pos[:k],
            energy=energy[:k],
            forces=forces[:k],
            x=atoms.get_positions(),
            p=atoms.get_momenta(),
            rng_keys=keys,
            rng_pos=p,
            rng_gauss=has_gauss,
            rng_cached=cached,
        )
        os.replace(tmp, ckpt)

    bar = tqdm(total=num, initial=done, desc=f"MD {prefix} {temperature:g} K", disable=not progress, mininterval=5.0)
    for k in range(done, num):
        dyn.run(interval)
        pos[k] = atoms.get_positions()
        energy[k] = atoms.get_potential_energy()
        forces[k] = atoms.get_forces()
        bar.update(1)
        if ckpt is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == num):
            save(k + 1)
    bar.close()
    return [
        replace(
            structure,
            positions=pos[k].copy(),
            energy=float(energy[k]),
            forces=forces[k].copy(),
            id=f"{prefix}/md{k}",
            source=f"{structure.source}+md{k}",
        )
        for k in range(num)
    ]


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
    temperature: float | Sequence[float] = 500.0,
    seed: int = 0,
    calculator: str = "gfn2",
    timestep_fs: float = 0.5,
    friction: float = 0.02,
    equilibration_steps: int = 0,
    progress: bool = True,
) -> Path:
    """Write a GFN2-xTB Langevin-MD set of ``molecule`` to ``path`` unless it exists (resumable: the MD state is
    checkpointed next to ``path`` as ``<path>.md.npz`` and removed once the file is written).

    Several temperatures make one trajectory each (``frames`` frames, seed ``seed + i`` for the i-th temperature),
    written as ``<stem>_<T>K.extxyz`` beside ``path`` and joined into ``path``."""
    from .readers import read_structures

    path = Path(path)
    if path.exists():
        return path
    if molecule not in NARROW:
        raise ValueError(f"molecule {molecule!r}: use one of {sorted(NARROW)}")
    if not isinstance(temperature, (int, float)):
        kw = dict(molecule=molecule, frames=frames, interval=interval, calculator=calculator, progress=progress)
        kw.update(timestep_fs=timestep_fs, friction=friction, equilibration_steps=equilibration_steps)
        parts = [
            ensure_md_set(path.with_name(f"{path.stem}_{t:g}K{path.suffix}"), temperature=float(t), seed=seed + i, **kw)
            for i, t in enumerate(temperature)
        ]
        write_extxyz([s for p in parts for s in read_structures(p)], path)
        return path
    t0 = time.time()
    steps = equilibration_steps + frames * interval
    _log(f"{path} missing: running {steps} steps of {calculator} Langevin MD of {molecule} at {temperature:g} K ...")
    start = structures_from_smiles([NARROW[molecule]], num_confs=1, seed=seed, names=[molecule])[0]
    ckpt = path.with_name(path.name + ".md.npz")
    out = langevin_md(
        start,
        frames,
        calculator=calculator,
        temperature=temperature,
        timestep_fs=timestep_fs,
        friction=friction,
        interval=interval,
        seed=seed,
        prefix=f"{molecule}_{temperature:g}K_s{seed}",
        equilibration_steps=equilibration_steps,
        checkpoint=ckpt,
        progress=progress,
    )
    info = [
        {"temperature_K": temperature, "time_fs": (equilibration_steps + (k + 1) * interval) * timestep_fs}
        for k in range(len(out))
    ]
    write_extxyz(out, path, info=info)
    ckpt.unlink(missing_ok=True)
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


def qm9_normal_mode_structures(
    num_molecules: int,
    temperatures: Sequence[float] = (300.0, 450.0, 600.0),
    seed: int = 0,
    exclude: Sequence[str] = tuple(NARROW.values()),
    progress: bool = True,
) -> list[Structure]:
    """Unlabelled QM9 geometries for a foundation set: ``num_molecules`` QM9 molecules (``exclude`` held out) x
    one normal-mode sample per temperature in ``temperatures``.

    The modes come from an MMFF94 Hessian at the QM9 (B3LYP) geometry: a GFN2-xTB finite-difference Hessian costs
    6N calls per molecule (about 3 s for 18 atoms here, 4 h for 5,000 molecules), MMFF94's about 20 ms, and only the
    geometries need to be thermal; the labels are GFN2-xTB's. A sample whose bond graph changes (a soft mode's
    harmonic amplitude is too large) is redrawn; molecules rdkit cannot type get Gaussian displacements (0.04 Å)."""
    from tqdm.auto import tqdm

    base = qm9_structures(num_molecules, seed, exclude=exclude)
    if base is None:
        raise ImportError("the QM9 foundation set needs qm9pack: pip install -c constraints.txt qm9pack")
    out: list[Structure] = []
    rng = np.random.default_rng(seed)
    for s in tqdm(base, desc="QM9 normal modes", disable=not progress, mininterval=5.0):
        hess = mmff_hessian(s)
        if hess is None:
            disp = thermal_displacements(s, len(temperatures), sigma=0.04, seed=int(rng.integers(1 << 31)))
            out.extend(disp)
            continue
        out.extend(_sample_modes(s, hess, temperatures, rng, prefix=s.id, check_bonds=True))
    return out


def split_by_molecule(
    src: str | Path, train_path: str | Path, val_path: str | Path, held_out_molecules: int, seed: int = 0
) -> tuple[Path, Path]:
    """Split a multi-molecule set into training and held-out files by molecule (ids ``<set>/<molecule>/<geometry>``):
    every geometry of ``held_out_molecules`` seeded molecules goes to ``val_path``, so validation measures how a model
    transfers to molecules it has not seen."""
    from .readers import read_structures

    frames = read_structures(src)
    mol = ["/".join(f.id.split("/")[:2]) for f in frames]
    names = sorted(set(mol))
    if held_out_molecules >= len(names):
        raise ValueError(f"{src}: {len(names)} molecules, cannot hold out {held_out_molecules}")
    held = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:held_out_molecules]}
    write_extxyz([f for f, m in zip(frames, mol, strict=True) if m in held], val_path)
    write_extxyz([f for f, m in zip(frames, mol, strict=True) if m not in held], train_path)
    return Path(train_path), Path(val_path)


def ensure_qm9_set(
    path: str | Path,
    num_molecules: int = 5000,
    temperatures: Sequence[float] = (300.0, 600.0),
    seed: int = 0,
    calculator: str = "gfn2",
    chunk_size: int = 500,
    progress: bool = True,
    full_path: str | Path | None = None,
    val_path: str | Path | None = None,
    held_out_molecules: int = 0,
) -> Path:
    """Write the QM9 normal-mode foundation set (:func:`qm9_normal_mode_structures`, GFN2-xTB labels) to ``path``
    unless it exists; labelling is resumable in chunks (:func:`~molecular.data.labelling.label_to_file`).

    With ``held_out_molecules``, the whole set is made at ``full_path`` and split by molecule
    (:func:`split_by_molecule`) into ``path`` (training) and ``val_path`` (held-out molecules)."""
    path = Path(path)
    if path.exists():
        return path
    if held_out_molecules:
        if full_path is None or val_path is None:
            raise ValueError("held_out_molecules needs full_path (the whole set) and val_path (the held-out file)")
        ensure_qm9_set(full_path, num_molecules, temperatures, seed, calculator, chunk_size, progress)
        split_by_molecule(full_path, path, val_path, held_out_molecules, seed)
        return path
    t0 = time.time()
    _log(f"{path} missing: {num_molecules} QM9 molecules x {len(temperatures)} normal-mode geometries, {calculator}")
    frames = qm9_normal_mode_structures(num_molecules, temperatures, seed, progress=progress)
    label_to_file(frames, path, calculator=calculator, chunk_size=chunk_size, progress=progress)
    _log(f"{path} done in {time.time() - t0:.0f} s")
    return path


def generate_set(path: str | Path, kind: str = "md", **kwargs: Any) -> Path:
    """Make a missing labelled file: ``kind="md"`` (:func:`ensure_md_set`, one molecule's Langevin MD),
    ``kind="broad"`` (:func:`ensure_broad_set`, many small molecules) or ``kind="qm9"`` (:func:`ensure_qm9_set`, QM9
    normal-mode geometries); ``kwargs`` go to that function."""
    makers = {"md": ensure_md_set, "broad": ensure_broad_set, "qm9": ensure_qm9_set}
    if kind not in makers:
        raise ValueError(
            f"data.generate.kind={kind!r}: use 'md' (one molecule's MD), 'broad' or 'qm9' (many molecules)"
        )
    return makers[kind](path, **kwargs)
