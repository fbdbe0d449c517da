"""Labels without downloads, and the per-element reference energies fitted on labels.

:func:`label_structures` runs any ASE calculator; the default is GFN2-xTB through ``tblite`` (Bannwarth, Ehlert,
Grimme, JCTC 2019), the cheap option rdkit MMFF94 (:class:`MMFFCalculator`). :func:`fit_atomic_energies` is the
least-squares E0 fit (MACE's ``E0s="average"``) every model of the project uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .structure import Structure, StructureError

__all__ = [
    "MMFFCalculator",
    "make_calculator",
    "resolve_calculator",
    "label_structures",
    "label_to_file",
    "fit_atomic_energies",
]


class MMFFCalculator(Calculator):
    """rdkit MMFF94 energies (eV) and analytic forces (eV/Å) as an ASE calculator.

    Bonds are perceived from the geometry the first time (rdkit ``DetermineBonds``) or given as an rdkit mol.
    Cheap; for sampling and pre-optimisation more than for labels.
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, mol=None, charge: int = 0, **kwargs):
        super().__init__(**kwargs)
        self._mol = mol
        self.charge = charge

    def _molecule(self, atoms):
        from rdkit import Chem
        from rdkit.Chem import rdDetermineBonds
        from rdkit.Geometry import Point3D

        if self._mol is None or self._mol.GetNumAtoms() != len(atoms):
            rw = Chem.RWMol()
            for z in atoms.get_atomic_numbers():
                rw.AddAtom(Chem.Atom(int(z)))
            conf = Chem.Conformer(len(atoms))
            for k, p in enumerate(atoms.get_positions()):
                conf.SetAtomPosition(k, Point3D(*map(float, p)))
            mol = rw.GetMol()
            mol.AddConformer(conf, assignId=True)
            rdDetermineBonds.DetermineBonds(mol, charge=self.charge)
            self._mol = mol
        return self._mol

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from ase.units import kcal
        from ase.units import mol as mol_unit
        from rdkit.Chem import AllChem

        super().calculate(atoms, properties, system_changes)
        mol = self._molecule(self.atoms)
        props = AllChem.MMFFGetMoleculeProperties(mol)
        if props is None:
            raise StructureError("MMFF94 has no parameters for this molecule; use the GFN2-xTB labeller")
        ff = AllChem.MMFFGetMoleculeForceField(mol, props)
        pos = self.atoms.get_positions().reshape(-1).tolist()
        to_ev = kcal / mol_unit  # kcal/mol -> eV
        self.results["energy"] = ff.CalcEnergy(pos) * to_ev
        self.results["forces"] = -np.asarray(ff.CalcGrad(pos)).reshape(-1, 3) * to_ev


def make_calculator(name: str = "gfn2", **kwargs):
    """An ASE calculator by name: ``gfn2`` / ``gfn1`` (tblite xTB), ``mmff`` (rdkit MMFF94)."""
    if name in ("gfn2", "gfn1"):
        from tblite.ase import TBLite

        return TBLite(method="GFN2-xTB" if name == "gfn2" else "GFN1-xTB", verbosity=0, **kwargs)
    if name == "mmff":
        return MMFFCalculator(**kwargs)
    raise ValueError(f"unknown calculator {name!r}: use 'gfn2', 'gfn1', 'mmff' or pass an ASE calculator object")


def resolve_calculator(calculator: Any):
    """A calculator from its name (see :func:`make_calculator`), or the calculator object itself."""
    return make_calculator(calculator) if isinstance(calculator, str) else calculator


def label_structures(
    structures: Sequence[Structure],
    calculator: Any = "gfn2",
    progress: bool = False,
    skip_failed: bool = False,
    desc: str = "labelling",
) -> list[Structure]:
    """Energies and forces from an ASE calculator (name or object, or a zero-arg factory) for every structure.

    ``skip_failed`` drops structures the calculator fails on (an SCF that does not converge) instead of stopping;
    ``progress`` shows a tqdm bar."""
    calc = (
        calculator()
        if callable(calculator) and not hasattr(calculator, "get_potential_energy")
        else resolve_calculator(calculator)
    )
    from tqdm.auto import tqdm

    out = []
    for k, s in enumerate(tqdm(structures, desc=desc, disable=not progress, mininterval=2.0)):
        atoms = s.to_atoms()
        atoms.calc = calc
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces())
        except Exception as err:
            if skip_failed:
                print(f"[molecular.data] {s.source or s.id or k}: labelling failed ({err}); skipped", flush=True)
                continue
            raise StructureError(f"{s.source or s.id or k}: labelling failed ({err})") from err
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            if skip_failed:
                continue
            raise StructureError(f"{s.source or s.id or k}: the calculator returned non-finite labels")
        out.append(replace(s, energy=energy, forces=forces))
    return out


def label_to_file(
    structures: Sequence[Structure],
    path: str | os.PathLike,
    calculator: Any = "gfn2",
    chunk_size: int = 500,
    progress: bool = True,
    skip_failed: bool = True,
    desc: str | None = None,
) -> Path:
    """Label ``structures`` once into the extxyz file ``path``, resumably, by one or several processes.

    Chunks of ``chunk_size`` structures are labelled into ``<path>.parts/partNNNNN.extxyz`` (each written to a
    temporary name and renamed, so an interrupted run loses at most the chunk in progress); a rerun skips the
    chunks already there. A process claims a chunk with a lock file (``partNNNNN.lock``, created exclusively, holding
    its pid; a dead process's lock is taken over), so several processes started on the same list share the work;
    the one that finds every chunk done joins them into ``path`` (atomically). An existing ``path`` is returned as
    is. The chunking assumes ``structures`` is deterministic (same seed, same list) in every process."""
    from .readers import read_structures, write_extxyz

    path = Path(path)
    if path.exists():
        return path
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(structures) + chunk_size - 1) // chunk_size
    calc = resolve_calculator(calculator) if isinstance(calculator, str) else calculator
    t0 = time.time()
    from tqdm.auto import tqdm

    def claim(lock: Path) -> bool:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)  # the holder is alive: its chunk
                return False
            except (ProcessLookupError, ValueError):  # a dead holder's (or a half-written) lock: take it over
                lock.write_text(str(os.getpid()))
                return True
            except (PermissionError, FileNotFoundError):
                return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True

    bar = tqdm(total=len(structures), desc=desc or f"labelling {path.name}", disable=not progress, mininterval=5.0)
    for c in range(n_chunks):
        chunk = structures[c * chunk_size : (c + 1) * chunk_size]
        part, lock = parts / f"part{c:05d}.extxyz", parts / f"part{c:05d}.lock"
        if not part.exists() and claim(lock):
            try:
                if not part.exists():
                    write_extxyz(label_structures(chunk, calc, skip_failed=skip_failed), part)
            finally:
                lock.unlink(missing_ok=True)
        bar.update(len(chunk))
    bar.close()
    names = [parts / f"part{c:05d}.extxyz" for c in range(n_chunks)]
    while not all(p.exists() for p in names):  # other processes are finishing their chunks
        if path.exists():
            return path
        if not any(parts.glob("*.lock")):
            raise RuntimeError(f"{parts}: chunks missing and no process labels them; rerun to finish")
        time.sleep(10)
    if path.exists():
        return path
    out: list[Structure] = []
    try:
        for p in names:
            out.extend(read_structures(p))
    except FileNotFoundError:  # another process joined them first
        if path.exists():
            return path
        raise
    write_extxyz(out, path)
    for p in names:
        p.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:  # a straggler's lock or temporary file
        pass
    print(
        f"[molecular.data] labelled {len(out)}/{len(structures)} structures into {path} in {time.time() - t0:.0f} s",
        flush=True,
    )
    return path


def fit_atomic_energies(structures: Sequence[Structure], z_table: Sequence[int]) -> list[float]:
    """Per-element reference energies E0 by least squares of total energy on element counts (MACE's
    ``E0s="average"``), so the network only learns the interaction energy."""
    z_index = {int(z): k for k, z in enumerate(z_table)}
    counts = np.zeros((len(structures), len(z_table)))
    energy = np.zeros(len(structures))
    for i, s in enumerate(structures):
        if s.energy is None:
            raise ValueError(f"{s.source or s.id}: no energy label; E0 fitting needs labelled structures")
        for z in s.numbers:
            counts[i, z_index[int(z)]] += 1
        energy[i] = s.energy
    # lstsq gives the minimum-norm answer when elements always co-occur in fixed ratios (one molecule)
    e0, *_ = np.linalg.lstsq(counts, energy, rcond=None)
    return [float(v) for v in e0]
