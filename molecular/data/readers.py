"""Readers of atomistic files into :class:`~molecular.data.Structure` lists, and the one extended-xyz writer.

- ASE (extxyz, xyz, cif, POSCAR, traj, ...): :func:`read_structures`;
- rdkit: conformers from SMILES (ETKDGv3, optionally MMFF94-relaxed, :func:`structures_from_smiles`), SDF/MOL files
  (:func:`read_sdf`), and rdkit molecules (:func:`mol_structures`);
- biotite: PDB / mmCIF (:func:`read_biomolecule`) and the bundled Chemical Component Dictionary (:func:`ccd_residue`).

Bad input stops with a :class:`~molecular.data.StructureError` naming the file, the item and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .structure import Structure, StructureError, stem

__all__ = [
    "read_structures",
    "structures_from_smiles",
    "read_sdf",
    "read_biomolecule",
    "ccd_residue",
    "mol_structures",
    "write_extxyz",
]


def _find_symbol(path: Path, symbol: str) -> tuple[int, int, int] | None:
    """``(line, frame, atom)`` (1-based line) of the first atom line of an (ext)xyz file whose element is
    ``symbol``, walking the frames by their atom-count lines; ``None`` when the layout is not xyz."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    k, frame = 0, 0
    while k < len(lines):
        head = lines[k].split()
        if not head:
            k += 1
            continue
        if len(head) != 1 or not head[0].isdigit():
            return None
        n = int(head[0])
        for i in range(n):
            row = lines[k + 2 + i].split() if k + 2 + i < len(lines) else []
            if row and row[0] == symbol:
                return k + 3 + i, frame, i
        k += n + 2
        frame += 1
    return None


def read_structures(
    path: str | os.PathLike,
    index: str = ":",
    format: str | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
) -> list[Structure]:
    """Read every structure of a file ASE can read (extxyz, xyz, cif, POSCAR, traj, ...).

    Ids are ``<file stem>/<item>`` unless the file stores ``id`` in each frame's info.
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: file not found; pass an existing extxyz/ASE-readable file")
    try:
        frames = ase.io.read(str(path), index=index, format=format)
    except KeyError as err:  # ASE's symbol table lookup: an element symbol it does not know
        symbol = str(err.args[0]) if err.args else "?"
        found = _find_symbol(path, symbol)
        where = f"{path}:{found[0]}/frame {found[1]} atom {found[2]}" if found else f"{path}"
        raise StructureError(
            f"unknown element {symbol!r} ({where}); use a chemical symbol (H, C, N, O, ...) in the species column"
        ) from err
    except Exception as err:  # ASE raises many types for malformed files
        raise StructureError(
            f"{path}: could not be read as {format or 'an ASE format (guessed from the extension)'} ({err}); "
            f"check the file (extxyz needs an atom count line, a comment line and one line per atom)"
        ) from err
    if not isinstance(frames, list):
        frames = [frames]
    out = []
    for k, atoms in enumerate(frames):
        out.append(
            Structure.from_atoms(
                atoms, id=f"{stem(path)}/{k}", source=f"{path}:{k}", energy_key=energy_key, forces_key=forces_key
            )
        )
    return out


def write_extxyz(
    structures: Sequence[Structure], path: str | os.PathLike, info: Sequence[Mapping] | None = None
) -> Path:
    """Write structures (with labels and ids) to an extended-xyz file, atomically; ``info[i]`` goes to the
    comment line (``atoms.info``) of frame ``i``."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for i, s in enumerate(structures):
        atoms = s.to_atoms()
        atoms.info.update(info[i] if info else {})
        frames.append(atoms)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    ase.io.write(str(tmp), frames, format="extxyz")
    os.replace(tmp, path)  # a half-written file never replaces an existing good one
    return path


def _mol_to_structures(mol, prefix: str, source: str) -> list[Structure]:
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    out = []
    for k, conf in enumerate(mol.GetConformers()):
        out.append(Structure(numbers, conf.GetPositions(), id=f"{prefix}/{k}", source=f"{source}/conf{k}"))
    return out


def mol_structures(mols: Sequence, conformer: int = -1) -> list[Structure]:
    """One unlabelled structure per rdkit molecule, at its conformer ``conformer`` (default: the first)."""
    out = []
    for m in mols:
        conf = m.GetConformer(conformer)
        out.append(Structure([a.GetAtomicNum() for a in m.GetAtoms()], conf.GetPositions()))
    return out


def structures_from_smiles(
    smiles: Iterable[str],
    num_confs: int = 1,
    seed: int = 0,
    optimize: str | None = "mmff",
    names: Sequence[str] | None = None,
) -> list[Structure]:
    """Conformers from SMILES with rdkit's ETKDGv3 (explicit hydrogens), optionally MMFF94-relaxed.

    A SMILES that does not parse or embed raises :class:`StructureError` naming its position and text.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    smiles = list(smiles)
    out: list[Structure] = []
    for k, smi in enumerate(smiles):
        name = names[k] if names is not None else f"smiles{k}"
        if not isinstance(smi, str) or not smi.strip():
            raise StructureError(f"SMILES item {k} is empty ({smi!r}); give a SMILES string or drop the item")
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            raise StructureError(f"SMILES item {k} ({smi!r}): rdkit cannot parse it; fix the SMILES string")
        mol = Chem.AddHs(mol)
        params = AllChem.ETKDGv3()
        # rdkit embeds every conformer of a molecule identically when randomSeed is 0: keep seeds >= 1
        params.randomSeed = int(seed) + k + 1
        ids = AllChem.EmbedMultipleConfs(mol, numConfs=int(num_confs), params=params)
        if len(ids) == 0:
            raise StructureError(
                f"SMILES item {k} ({smi!r}): ETKDG could not embed a conformer; try another seed or check "
                f"the stereochemistry"
            )
        if optimize == "mmff":
            AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
        elif optimize not in (None, "none"):
            raise ValueError(f"optimize={optimize!r}: use 'mmff' or None")
        out.extend(_mol_to_structures(mol, name, f"SMILES {k} ({smi})"))
    return out


def read_sdf(path: str | os.PathLike, remove_hs: bool = False) -> list[Structure]:
    """Read an SDF/MOL file with rdkit (3-D coordinates kept, hydrogens kept by default)."""
    from rdkit import Chem

    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: file not found")
    supplier = Chem.SDMolSupplier(str(path), removeHs=remove_hs, sanitize=True)
    out: list[Structure] = []
    for k, mol in enumerate(supplier):
        if mol is None:
            raise StructureError(f"{path}: molecule {k} is malformed (rdkit could not parse it); fix or remove it")
        if mol.GetNumConformers() == 0:
            raise StructureError(
                f"{path}: molecule {k} has no coordinates; an SDF block with 3-D coordinates is needed"
            )
        out.extend(_mol_to_structures(mol, f"{stem(path)}/{k}", f"{path}:{k}"))
    if not out:
        raise StructureError(f"{path}: no molecules in the file")
    return out


def _atomarray_to_structure(arr, id: str, source: str) -> Structure:
    from ase.data import atomic_numbers

    numbers = []
    for k, el in enumerate(arr.element):
        sym = str(el).strip().capitalize()
        if sym not in atomic_numbers:
            raise StructureError(f"{source}: atom {k} has unknown element {el!r}; fix the element column")
        numbers.append(atomic_numbers[sym])
    return Structure(np.array(numbers), np.asarray(arr.coord, dtype=np.float64), id=id, source=source)


def read_biomolecule(path: str | os.PathLike, model: int = 1, keep_hetero: bool = True) -> list[Structure]:
    """Read PDB / mmCIF (``.pdb``, ``.cif``, ``.bcif``) with biotite; one structure per model (or the one chosen)."""
    import biotite.structure.io as strucio

    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: file not found")
    try:
        stack = strucio.load_structure(str(path), model=model) if model else strucio.load_structure(str(path))
    except Exception as err:
        raise StructureError(f"{path}: biotite could not read it as PDB/mmCIF ({err}); check the file") from err
    from biotite.structure import AtomArrayStack

    arrays = list(stack) if isinstance(stack, AtomArrayStack) else [stack]  # model=None gives every model
    out = []
    for k, arr in enumerate(arrays):
        if not keep_hetero:
            arr = arr[~arr.hetero]
        number = model if model else k + 1
        out.append(_atomarray_to_structure(arr, f"{stem(path)}/model{number}", f"{path}:model{number}"))
    return out


def ccd_residue(name: str) -> Structure:
    """Ideal coordinates of a residue/ligand from biotite's bundled Chemical Component Dictionary (offline)."""
    import biotite.structure.info as info

    try:
        arr = info.residue(name.upper())
    except Exception as err:
        raise StructureError(f"CCD residue {name!r}: not in the Chemical Component Dictionary ({err})") from err
    return _atomarray_to_structure(arr, f"ccd/{name.upper()}", f"CCD:{name.upper()}")
