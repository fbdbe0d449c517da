"""Protein structures in: PDB, mmCIF and BinaryCIF through biotite into the molecular backend's structures.

A :class:`ProteinStructure` is a :class:`molecular.data.Structure` (numbers, positions in Å, id, source: every
encoder, teacher and graph builder of the molecular backend takes it as is) plus per-atom annotations: residue
index (0..R-1, in file order), residue name, author residue number, chain id, atom name and the hetero flag, and
the atom37 layout (:mod:`molecular.proteins.constants`) computed from them.

Reading options (:class:`ReadOptions`), each with a stated default:

- ``altloc``: alternate locations, ``"occupancy"`` (the highest-occupancy one per atom, default) or ``"first"``;
- ``hydrogens``: ``"keep"`` (default), ``"drop"``, or ``"add"`` (heavy atoms only, then hydrogens placed by
  ``hydride`` on neutral residues; ``pip install hydride``);
- ``hetero``: hetero residues that are not water (ligands, ions, modified residues written as HETATM):
  ``"drop"`` (default) or ``"keep"``; ``waters``: ``"drop"`` (default) or ``"keep"``;
- ``missing``: a standard residue without one of the atoms ``require`` asks for (``"backbone"``: N, CA, C
  (default); ``"heavy"``: every heavy atom of its type, OXT excepted) raises a :class:`StructureError` naming the
  chain, residue and atom (``"error"``, default), is dropped (``"drop"``) or kept (``"keep"``; its atom37 mask
  is false where atoms are missing);
- ``chains``: keep only these chain ids; ``model``: the model number (1-based) of a multi-model file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molecular.data import Structure, StructureError

from .constants import ATOM37, ATOM37_INDEX, BACKBONE, ONE_LETTER, RESIDUE_ATOMS, RESIDUES, UNK, WATERS, residue_type

__all__ = [
    "ReadOptions",
    "ProteinStructure",
    "read_protein",
    "read_proteins",
    "protein_from_atom_array",
    "protein_to_atom_array",
    "write_pdb",
    "write_cif",
]

_EMPTY_STR = np.zeros(0, dtype="<U4")


@dataclass(frozen=True)
class ReadOptions:
    """How :func:`read_protein` treats alternate locations, hydrogens, hetero residues, waters, missing atoms."""

    model: int = 1
    chains: tuple[str, ...] | None = None
    altloc: str = "occupancy"
    hydrogens: str = "keep"
    hetero: str = "drop"
    waters: str = "drop"
    missing: str = "error"
    require: str = "backbone"

    def __post_init__(self) -> None:
        choices = {
            "altloc": ("occupancy", "first"),
            "hydrogens": ("keep", "drop", "add"),
            "hetero": ("drop", "keep"),
            "waters": ("drop", "keep"),
            "missing": ("error", "drop", "keep"),
            "require": ("backbone", "heavy"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ReadOptions.{key}={getattr(self, key)!r}: use one of {allowed}")
        if self.chains is not None:
            object.__setattr__(self, "chains", tuple(str(c) for c in self.chains))


@dataclass
class ProteinStructure(Structure):
    """A :class:`~molecular.data.Structure` with residue and chain annotations (one entry per atom).

    Attributes:
        atom_names: PDB atom names ``[N]`` (``"CA"``, ``"OG1"``...).
        residue_index: residue of each atom, ``0 .. R-1`` in file order ``[N]``.
        residue_names: three-letter residue name of each atom ``[N]``.
        residue_ids: author residue number of each atom ``[N]``.
        chain_ids: chain id of each atom ``[N]``.
        hetero: HETATM flag of each atom ``[N]``.
    """

    atom_names: np.ndarray = field(default_factory=lambda: _EMPTY_STR)
    residue_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    residue_names: np.ndarray = field(default_factory=lambda: _EMPTY_STR)
    residue_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chain_ids: np.ndarray = field(default_factory=lambda: _EMPTY_STR)
    hetero: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.numbers)
        self.atom_names = np.asarray(self.atom_names, dtype=str).reshape(-1)
        self.residue_index = np.asarray(self.residue_index, dtype=np.int64).reshape(-1)
        self.residue_names = np.asarray(self.residue_names, dtype=str).reshape(-1)
        self.residue_ids = np.asarray(self.residue_ids, dtype=np.int64).reshape(-1)
        self.chain_ids = np.asarray(self.chain_ids, dtype=str).reshape(-1)
        self.hetero = np.asarray(self.hetero, dtype=bool).reshape(-1)
        if len(self.hetero) == 0 and n:
            self.hetero = np.zeros(n, dtype=bool)
        for name in ("atom_names", "residue_index", "residue_names", "residue_ids", "chain_ids", "hetero"):
            if len(getattr(self, name)) != n:
                raise StructureError(
                    f"{self.source or self.id}: annotation {name} has {len(getattr(self, name))} entries for {n} atoms"
                )
        if n and (np.diff(self.residue_index) < 0).any():
            raise StructureError(f"{self.source or self.id}: residue_index must be non-decreasing (atoms in order)")

    # -- residues -------------------------------------------------------------------------------------------
    @property
    def num_residues(self) -> int:
        return int(self.residue_index[-1]) + 1 if len(self.residue_index) else 0

    def _first_atom(self) -> np.ndarray:
        """Index of the first atom of every residue ``[R]``."""
        return np.searchsorted(self.residue_index, np.arange(self.num_residues))

    @property
    def residue_name_list(self) -> list[str]:
        return [str(x) for x in self.residue_names[self._first_atom()]]

    @property
    def residue_types(self) -> np.ndarray:
        """Type of every residue in :data:`~molecular.proteins.constants.RESIDUES` (``UNK`` = 20) ``[R]``."""
        return np.array([residue_type(r) for r in self.residue_name_list], dtype=np.int64)

    @property
    def residue_chains(self) -> np.ndarray:
        """Chain id of every residue ``[R]``."""
        return self.chain_ids[self._first_atom()]

    @property
    def residue_numbers(self) -> np.ndarray:
        """Author residue number of every residue ``[R]``."""
        return self.residue_ids[self._first_atom()]

    @property
    def sequence(self) -> str:
        return "".join(ONE_LETTER.get(r, "X") for r in self.residue_name_list)

    def residue_label(self, r: int) -> str:
        """``chain A residue GLY 12`` (for messages)."""
        k = int(self._first_atom()[r])
        chain = str(self.chain_ids[k]) or "(blank)"
        return f"chain {chain} residue {self.residue_names[k]} {self.residue_ids[k]}"

    @property
    def atom37_slot(self) -> np.ndarray:
        """Slot of every atom in the atom37 layout, ``-1`` for hydrogens and names outside it ``[N]``."""
        slot = np.array([ATOM37_INDEX.get(str(a), -1) for a in self.atom_names], dtype=np.int64)
        slot[self.numbers == 1] = -1
        return slot

    def atom_index(self, name: str) -> np.ndarray:
        """Atom index of ``name`` (e.g. ``"CA"``) in every residue, ``-1`` where a residue has none ``[R]``."""
        out = np.full(self.num_residues, -1, dtype=np.int64)
        hit = np.nonzero(self.atom_names == name)[0]
        out[self.residue_index[hit[::-1]]] = hit[::-1]  # the first such atom wins
        return out

    def atom37(self) -> tuple[np.ndarray, np.ndarray]:
        """``coords[R, 37, 3]`` (Å, zeros where absent) and ``mask[R, 37]``."""
        coords = np.zeros((self.num_residues, len(ATOM37), 3))
        mask = np.zeros((self.num_residues, len(ATOM37)), dtype=bool)
        slot = self.atom37_slot
        keep = slot >= 0
        coords[self.residue_index[keep], slot[keep]] = self.positions[keep]
        mask[self.residue_index[keep], slot[keep]] = True
        return coords, mask

    def select_atoms(self, keep: np.ndarray, id: str | None = None) -> ProteinStructure:
        """The atoms where ``keep[N]`` is true (residues renumbered 0..R'-1)."""
        keep = np.asarray(keep, dtype=bool)
        _, residue_index = np.unique(self.residue_index[keep], return_inverse=True)
        return ProteinStructure(
            numbers=self.numbers[keep],
            positions=self.positions[keep],
            energy=None,
            forces=None if self.forces is None else self.forces[keep],
            id=self.id if id is None else id,
            source=self.source,
            atom_names=self.atom_names[keep],
            residue_index=residue_index.reshape(-1),
            residue_names=self.residue_names[keep],
            residue_ids=self.residue_ids[keep],
            chain_ids=self.chain_ids[keep],
            hetero=self.hetero[keep],
        )

    def amino_acids_only(self) -> ProteinStructure:
        """The residues that have a backbone (N, CA, C): drops ions, ligands and solvent written as ATOM records."""
        has = np.zeros(self.num_residues, dtype=bool)
        for r in range(self.num_residues):
            names = set(self.atom_names[self.residue_index == r].tolist())
            has[r] = {"N", "CA", "C"} <= names
        return self if has.all() else self.select_atoms(has[self.residue_index])

    def select_residues(self, residues: Sequence[int] | np.ndarray, id: str | None = None) -> ProteinStructure:
        """The given residues (a crop), in their original order."""
        chosen = np.zeros(self.num_residues, dtype=bool)
        chosen[np.asarray(residues, dtype=np.int64)] = True
        return self.select_atoms(chosen[self.residue_index], id)


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def _load_array(path: Path, opts: ReadOptions):
    """biotite ``AtomArray`` of one model, alternate locations resolved."""
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    suffix = "".join(path.suffixes[-1:]).lower()
    extra = ["occupancy"]
    try:
        if suffix == ".pdb" or suffix == ".ent":
            f = pdb.PDBFile.read(str(path))
            n_models = f.get_model_count()
            if opts.model > n_models:
                raise StructureError(f"{path}: model {opts.model} requested, the file has {n_models}")
            return f.get_structure(model=opts.model, altloc=opts.altloc, extra_fields=extra)
        if suffix in (".cif", ".mmcif", ".bcif"):
            f = pdbx.BinaryCIFFile.read(str(path)) if suffix == ".bcif" else pdbx.CIFFile.read(str(path))
            n_models = pdbx.get_model_count(f)
            if opts.model > n_models:
                raise StructureError(f"{path}: model {opts.model} requested, the file has {n_models}")
            return pdbx.get_structure(f, model=opts.model, altloc=opts.altloc, extra_fields=extra)
    except StructureError:
        raise
    except Exception as err:
        raise StructureError(
            f"{path}: biotite could not read it ({type(err).__name__}: {err}); check the file"
        ) from err
    raise StructureError(f"{path}: unknown structure format {suffix!r}; use .pdb, .cif/.mmcif or .bcif")


def read_protein(path: str | os.PathLike, options: ReadOptions | None = None, **kwargs) -> ProteinStructure:
    """Read one model of a PDB / mmCIF / BinaryCIF file (options as :class:`ReadOptions` or keywords)."""
    opts = options if options is not None else ReadOptions(**kwargs)
    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: file not found")
    arr = _load_array(path, opts)
    stem = path.name.split(".")[0]
    return protein_from_atom_array(
        arr, id=f"{stem}/model{opts.model}", source=f"{path}:model{opts.model}", options=opts
    )


def read_proteins(
    paths: Sequence[str | os.PathLike], options: ReadOptions | None = None, **kwargs
) -> list[ProteinStructure]:
    """:func:`read_protein` over several files (same options)."""
    return [read_protein(p, options, **kwargs) for p in paths]


def _element_numbers(arr, source: str) -> np.ndarray:
    from ase.data import atomic_numbers

    numbers = np.zeros(arr.array_length(), dtype=np.int64)
    for k, el in enumerate(arr.element):
        sym = str(el).strip().capitalize()
        if sym not in atomic_numbers or sym == "X":
            raise StructureError(
                f"{source}: chain {arr.chain_id[k] or '(blank)'} residue {arr.res_name[k]} {arr.res_id[k]} atom "
                f"{arr.atom_name[k]}: unknown element {el!r}; fix the element column (columns 77-78 of a PDB line)"
            )
        numbers[k] = atomic_numbers[sym]
    return numbers


def _add_hydrogens(arr, source: str):
    try:
        import hydride
    except ImportError as err:
        raise ImportError("hydrogens='add' needs hydride: .venv/bin/pip install -c constraints.txt hydride") from err
    import biotite.structure as struc

    arr = arr[arr.element != "H"]
    arr.bonds = struc.connect_via_residue_names(arr)
    if "charge" not in arr.get_annotation_categories():
        arr.set_annotation("charge", np.zeros(arr.array_length(), dtype=int))
    try:
        out, _ = hydride.add_hydrogen(arr)
    except Exception as err:
        raise StructureError(
            f"{source}: hydride could not add hydrogens ({err}); use hydrogens='keep' or 'drop'"
        ) from err
    return out


def protein_from_atom_array(
    arr, id: str = "protein", source: str = "", options: ReadOptions | None = None
) -> ProteinStructure:
    """A biotite ``AtomArray`` -> :class:`ProteinStructure`, applying the :class:`ReadOptions`."""
    import biotite.structure as struc

    opts = options or ReadOptions()
    source = source or id
    if arr.array_length() == 0:
        raise StructureError(f"{source}: no atoms")
    if opts.chains is not None:
        arr = arr[np.isin(arr.chain_id, opts.chains)]
        if arr.array_length() == 0:
            raise StructureError(f"{source}: none of the chains {list(opts.chains)} are in the file")
    water = np.isin(np.char.upper(arr.res_name.astype(str)), list(WATERS))
    if opts.waters == "drop":
        arr, water = arr[~water], water[~water]
    if opts.hetero == "drop":
        # HETATM records that are not water; modified residues inside a chain (MSE) go too, with a stated option
        arr = arr[~arr.hetero | water]
    if opts.hydrogens == "drop":
        arr = arr[arr.element != "H"]
    elif opts.hydrogens == "add":
        arr = _add_hydrogens(arr, source)
    if arr.array_length() == 0:
        raise StructureError(f"{source}: no atoms left after the reading options {opts}")
    if not np.isfinite(arr.coord).all():
        k = int(np.nonzero(~np.isfinite(arr.coord).all(1))[0][0])
        raise StructureError(
            f"{source}: chain {arr.chain_id[k] or '(blank)'} residue {arr.res_name[k]} {arr.res_id[k]} atom "
            f"{arr.atom_name[k]}: NaN or infinite coordinates; fix or drop the atom"
        )
    numbers = _element_numbers(arr, source)
    starts = struc.get_residue_starts(arr)
    residue_index = np.zeros(arr.array_length(), dtype=np.int64)
    residue_index[starts[1:]] = 1
    residue_index = np.cumsum(residue_index)
    protein = ProteinStructure(
        numbers=numbers,
        positions=np.asarray(arr.coord, dtype=np.float64),
        id=id,
        source=source,
        atom_names=arr.atom_name.astype(str),
        residue_index=residue_index,
        residue_names=arr.res_name.astype(str),
        residue_ids=arr.res_id.astype(np.int64),
        chain_ids=arr.chain_id.astype(str),
        hetero=arr.hetero,
    )
    return _check_residues(protein, opts)


def _check_residues(protein: ProteinStructure, opts: ReadOptions) -> ProteinStructure:
    """Apply ``missing`` / ``require`` to the standard residues."""
    if opts.missing == "keep":
        return protein
    drop = np.zeros(protein.num_residues, dtype=bool)
    names = protein.residue_name_list
    for r in range(protein.num_residues):
        kind = residue_type(names[r])
        atoms = set(protein.atom_names[protein.residue_index == r].tolist())
        if kind == UNK and not ({"N", "CA", "C"} <= atoms):
            continue  # a ligand or an unknown residue kept by hetero='keep': nothing is required of it
        required = BACKBONE[:3] if opts.require == "backbone" else RESIDUE_ATOMS.get(RESIDUES[kind], BACKBONE[:3])
        absent = [a for a in required if a not in atoms]
        if absent:
            if opts.missing == "error":
                raise StructureError(
                    f"{protein.source}: {protein.residue_label(r)} is missing atom(s) {absent} "
                    f"(require={opts.require!r}); complete the structure (PDBFixer), or read with missing='drop' to "
                    f"skip such residues or missing='keep' to keep them with a partial atom37 mask"
                )
            drop[r] = True
    if not drop.any():
        return protein
    if drop.all():
        raise StructureError(f"{protein.source}: every residue is incomplete (require={opts.require!r})")
    return protein.select_atoms(~drop[protein.residue_index])


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def protein_to_atom_array(protein: ProteinStructure, positions: np.ndarray | None = None):
    """A biotite ``AtomArray`` of the protein (optionally at other ``positions[N, 3]``)."""
    import biotite.structure as struc
    from ase.data import chemical_symbols

    n = len(protein)
    arr = struc.AtomArray(n)
    arr.coord = np.asarray(protein.positions if positions is None else positions, dtype=np.float32)
    arr.element = np.array([chemical_symbols[z].upper() for z in protein.numbers])
    arr.atom_name = protein.atom_names
    arr.res_name = protein.residue_names
    arr.res_id = protein.residue_ids
    arr.chain_id = protein.chain_ids
    arr.hetero = protein.hetero
    return arr


def write_pdb(protein: ProteinStructure, path: str | os.PathLike | None = None, positions=None) -> str:
    """Write a PDB file (or return its text when ``path`` is ``None``)."""
    import biotite.structure.io.pdb as pdb

    f = pdb.PDBFile()
    f.set_structure(protein_to_atom_array(protein, positions))
    buf = io.StringIO()
    f.write(buf)
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def write_cif(protein: ProteinStructure, path: str | os.PathLike, binary: bool = False) -> None:
    """Write an mmCIF (or BinaryCIF with ``binary=True``) file."""
    import biotite.structure.io.pdbx as pdbx

    f = pdbx.BinaryCIFFile() if binary else pdbx.CIFFile()
    pdbx.set_structure(f, protein_to_atom_array(protein))
    f.write(str(path))
