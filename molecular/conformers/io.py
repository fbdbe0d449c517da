"""Writers for generated conformers: SDF (rdkit, with bonds) and extended XYZ (ase, with per-frame info)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rdkit import Chem

__all__ = ["write_sdf", "write_extxyz"]


def _atomic_replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)  # a half-written file never replaces an existing good one


def write_sdf(mols: Sequence[Chem.Mol], path: str | Path, props: Sequence[dict] | None = None) -> Path:
    """Write one record per Mol (first conformer); ``props[i]`` become SD properties of record ``i``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = Chem.SDWriter(str(tmp))
    for i, m in enumerate(mols):
        m = Chem.Mol(m)
        for k, v in (props[i] if props else {}).items():
            m.SetProp(str(k), str(v))
        writer.write(m)
    writer.close()
    _atomic_replace(tmp, path)
    return path


def write_extxyz(mols: Sequence[Chem.Mol], path: str | Path, props: Sequence[dict] | None = None) -> Path:
    """Write all Mols as frames of one extended-XYZ file; ``props[i]`` go to ``atoms.info`` of frame ``i``."""
    from ase import Atoms
    from ase.io import write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for i, m in enumerate(mols):
        atoms = Atoms(numbers=[a.GetAtomicNum() for a in m.GetAtoms()], positions=m.GetConformer().GetPositions())
        atoms.info["smiles"] = Chem.MolToSmiles(Chem.RemoveHs(m))
        atoms.info.update(props[i] if props else {})
        frames.append(atoms)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp), frames, format="extxyz")
    _atomic_replace(tmp, path)
    return path
