"""Writers for generated conformers: SDF (rdkit, with bonds) and extended XYZ (the one writer of
:mod:`molecular.data`, with per-frame info)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rdkit import Chem

from molecular.data import mol_structures
from molecular.data import write_extxyz as write_structures

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
    """Write all Mols (first conformer) as frames of one extended-XYZ file with :func:`molecular.data.write_extxyz`;
    each frame's info holds the molecule's SMILES and ``props[i]``."""
    info = [{"smiles": Chem.MolToSmiles(Chem.RemoveHs(m)), **(props[i] if props else {})} for i, m in enumerate(mols)]
    return write_structures(mol_structures(mols), path, info=info)
