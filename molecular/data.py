"""Atomistic data: structures, readers, validation, neighbour graphs, batching, splits, caching, labelling.

Atoms are tokens: a batch of molecules is one :class:`GraphBatch` whose ``batch`` vector (graph index per atom,
the torch_geometric convention) turns any per-atom feature matrix into a :class:`unirep.TokenSet`.

The graph layout is the one MACE's modules consume (ACEsuit/mace ``mace/data/neighborhood.py``,
``mace/modules/utils.py``): ``edge_index = [sender, receiver]``, edge vector
``r_receiver - r_sender + shifts`` with ``shifts = unit_shifts @ cell``. Neighbour lists come from
``matscipy.neighbours.neighbour_list`` (pyg-lib's ``radius_graph`` does not install here).

Units follow ASE: Å, eV, eV/Å. Labels without downloads: :func:`label_structures` runs any ASE calculator;
the default is GFN2-xTB through ``tblite`` (Bannwarth, Ehlert, Grimme, JCTC 2019), the cheap option rdkit
MMFF94 (:class:`MMFFCalculator`). Geometry sampling: random or normal-mode thermal displacements and short
Langevin MD, as rMD17-style narrow sets are made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from torch import Tensor

from unirep.tokens import TokenSet

__all__ = [
    "StructureError",
    "Structure",
    "read_structures",
    "structures_from_smiles",
    "read_sdf",
    "read_biomolecule",
    "ccd_residue",
    "write_extxyz",
    "validate_structures",
    "neighbour_graph",
    "AtomicGraph",
    "GraphBatch",
    "collate_graphs",
    "regraph",
    "AtomsDataset",
    "split_indices",
    "load_dataset",
    "make_calculator",
    "MMFFCalculator",
    "label_structures",
    "thermal_displacements",
    "normal_mode_samples",
    "langevin_md",
]


class StructureError(ValueError):
    """Bad atomistic input; the message names the file (or source), the item and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Structure:
    """One labelled (or unlabelled) atomic structure.

    Attributes:
        numbers: atomic numbers ``[N]``.
        positions: Cartesian coordinates in Å ``[N, 3]`` (float64).
        energy: total energy in eV, or ``None``.
        forces: forces in eV/Å ``[N, 3]``, or ``None``.
        cell: lattice vectors ``[3, 3]`` in Å (zeros for a molecule).
        pbc: periodicity along each lattice vector.
        id: a stable identifier (used by the teacher-feature cache, so it must be unique in a data set).
        source: where it came from, ``file:item``, for error messages.
    """

    numbers: np.ndarray
    positions: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: tuple[bool, bool, bool] = (False, False, False)
    id: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(self.pbc), (3,)))
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        if self.energy is not None:
            self.energy = float(self.energy)

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.energy is not None and self.forces is not None

    def to_atoms(self):
        """An ``ase.Atoms`` with the labels attached as a single-point calculator."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        atoms.info["id"] = self.id
        if self.energy is not None or self.forces is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=self.energy, forces=self.forces)
        return atoms

    @classmethod
    def from_atoms(
        cls, atoms, id: str = "", source: str = "", energy_key: str = "energy", forces_key: str = "forces"
    ) -> Structure:
        """From ``ase.Atoms``; labels from ``atoms.info``/``atoms.arrays`` keys or an attached calculator."""
        energy = atoms.info.get(energy_key)
        forces = atoms.arrays.get(forces_key)
        calc = atoms.calc
        if calc is not None and getattr(calc, "results", None):
            if energy is None and "energy" in calc.results:
                energy = calc.results["energy"]
            if forces is None and "forces" in calc.results:
                forces = calc.results["forces"]
        return cls(
            numbers=atoms.get_atomic_numbers(),
            positions=atoms.get_positions(),
            energy=energy,
            forces=forces,
            cell=np.asarray(atoms.get_cell()),
            pbc=tuple(atoms.get_pbc()),
            id=str(atoms.info.get("id", id) or id),
            source=source,
        )


def _stem(path: str | os.PathLike) -> str:
    return Path(path).name.split(".")[0]


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
                atoms, id=f"{_stem(path)}/{k}", source=f"{path}:{k}", energy_key=energy_key, forces_key=forces_key
            )
        )
    return out


def write_extxyz(structures: Sequence[Structure], path: str | os.PathLike) -> Path:
    """Write structures (with labels and ids) to an extended-xyz file, atomically."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    ase.io.write(str(tmp), [s.to_atoms() for s in structures], format="extxyz")
    os.replace(tmp, path)
    return path


def _mol_to_structures(mol, prefix: str, source: str) -> list[Structure]:
    from rdkit import Chem  # noqa: F401  (rdkit must be importable for mol objects anyway)

    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    out = []
    for k, conf in enumerate(mol.GetConformers()):
        out.append(Structure(numbers, conf.GetPositions(), id=f"{prefix}/{k}", source=f"{source}/conf{k}"))
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
        out.extend(_mol_to_structures(mol, f"{_stem(path)}/{k}", f"{path}:{k}"))
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
        out.append(_atomarray_to_structure(arr, f"{_stem(path)}/model{number}", f"{path}:model{number}"))
    return out


def ccd_residue(name: str) -> Structure:
    """Ideal coordinates of a residue/ligand from biotite's bundled Chemical Component Dictionary (offline)."""
    import biotite.structure.info as info

    try:
        arr = info.residue(name.upper())
    except Exception as err:
        raise StructureError(f"CCD residue {name!r}: not in the Chemical Component Dictionary ({err})") from err
    return _atomarray_to_structure(arr, f"ccd/{name.upper()}", f"CCD:{name.upper()}")


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def validate_structures(
    structures: Sequence[Structure],
    z_table: Sequence[int] | None = None,
    require_labels: bool = False,
    min_distance: float = 0.5,
    name: str = "data set",
) -> None:
    """Raise :class:`StructureError` naming the first bad item: empty set, NaN, overlapping atoms, unknown
    element, missing or malformed labels, duplicate ids."""
    if len(structures) == 0:
        raise StructureError(f"{name}: no structures; check the file path or the filter that produced the set")
    allowed = None if z_table is None else {int(z) for z in z_table}
    seen: set[str] = set()
    for k, s in enumerate(structures):
        where = s.source or f"{name}:{k}"
        if len(s) == 0:
            raise StructureError(f"{where} (item {k}): structure has no atoms")
        if not np.isfinite(s.positions).all():
            raise StructureError(f"{where} (item {k}): NaN or infinite coordinates; fix or drop this structure")
        if allowed is not None:
            bad = sorted({int(z) for z in s.numbers} - allowed)
            if bad:
                from ase.data import chemical_symbols

                raise StructureError(
                    f"{where} (item {k}): element(s) {[chemical_symbols[z] for z in bad]} are not in the model's "
                    f"element table {sorted(allowed)}; drop the structure or add the element to z_table"
                )
        if len(s) > 1 and min_distance > 0:
            d = np.linalg.norm(s.positions[:, None] - s.positions[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            if d.min() < min_distance:
                i, j = np.unravel_index(np.argmin(d), d.shape)
                raise StructureError(
                    f"{where} (item {k}): atoms {i} and {j} overlap ({d.min():.3f} Å < {min_distance} Å); "
                    f"fix the coordinates or lower min_distance"
                )
        if require_labels:
            if s.energy is None or s.forces is None:
                missing = [n for n, v in (("energy", s.energy), ("forces", s.forces)) if v is None]
                raise StructureError(
                    f"{where} (item {k}): missing label(s) {missing}; label the set first "
                    f"(molecular.data.label_structures) or give the right energy_key/forces_key"
                )
            if not math.isfinite(s.energy) or not np.isfinite(s.forces).all():
                raise StructureError(f"{where} (item {k}): NaN/inf in the energy or forces labels")
            if s.forces.shape != s.positions.shape:
                raise StructureError(f"{where} (item {k}): forces shape {s.forces.shape} != positions shape")
        if s.id:
            if s.id in seen:
                raise StructureError(f"{where} (item {k}): duplicate id {s.id!r}; ids must be unique in a data set")
            seen.add(s.id)


# ---------------------------------------------------------------------------------------------------------------
# Graphs and batches
# ---------------------------------------------------------------------------------------------------------------
def neighbour_graph(
    positions: np.ndarray, r_max: float, cell: np.ndarray | None = None, pbc: Sequence[bool] = (False, False, False)
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges within ``r_max`` (self-edges excluded): ``edge_index[2, E]`` (sender, receiver) and
    integer ``unit_shifts[E, 3]`` such that the edge vector is ``r[receiver] - r[sender] + unit_shifts @ cell``."""
    from matscipy.neighbours import neighbour_list

    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        # matscipy needs a box; a molecule gets one larger than its extent, with no periodicity
        extent = positions.max(0) - positions.min(0) if len(positions) else np.zeros(3)
        cell = np.diag(extent + 2 * r_max + 1.0)
        pos = positions - positions.min(0) + r_max + 0.5 if len(positions) else positions
    else:
        if abs(np.linalg.det(cell)) < 1e-8:
            raise StructureError("periodic structure with a singular cell; give a proper cell or pbc=False")
        pos = positions
    i, j, S = neighbour_list("ijS", positions=pos, cell=cell, pbc=pbc, cutoff=float(r_max))
    # matscipy: D = r[j] - r[i] + S @ cell, i.e. i sends to j. MACE uses r[receiver] - r[sender] + shifts.
    keep = ~((i == j) & (S == 0).all(1))
    edge_index = np.stack([i[keep], j[keep]]).astype(np.int64)
    return edge_index, S[keep].astype(np.int64)


@dataclass
class AtomicGraph:
    """A single structure as tensors, ready for collation."""

    numbers: Tensor  # [N] long
    positions: Tensor  # [N, 3] float64
    edge_index: Tensor  # [2, E] long
    unit_shifts: Tensor  # [E, 3] float64 (integer values)
    cell: Tensor  # [3, 3] float64
    pbc: Tensor  # [3] bool
    energy: Tensor | None  # [] float64
    forces: Tensor | None  # [N, 3] float64
    id: str

    @classmethod
    def from_structure(cls, s: Structure, r_max: float) -> AtomicGraph:
        ei, us = neighbour_graph(s.positions, r_max, s.cell, s.pbc)
        return cls(
            numbers=torch.as_tensor(s.numbers, dtype=torch.long),
            positions=torch.as_tensor(s.positions, dtype=torch.float64),
            edge_index=torch.as_tensor(ei),
            unit_shifts=torch.as_tensor(us, dtype=torch.float64),
            cell=torch.as_tensor(s.cell, dtype=torch.float64),
            pbc=torch.tensor(s.pbc, dtype=torch.bool),
            energy=None if s.energy is None else torch.tensor(s.energy, dtype=torch.float64),
            forces=None if s.forces is None else torch.as_tensor(s.forces, dtype=torch.float64),
            id=s.id,
        )


@dataclass
class GraphBatch:
    """A padding-free batch of atomic graphs (atoms are tokens, ``batch`` the graph index).

    ``energy[B]`` and ``forces[T, 3]`` are ``None`` when the batch is unlabelled.
    """

    numbers: Tensor  # [T]
    positions: Tensor  # [T, 3]
    edge_index: Tensor  # [2, E], offsets applied
    shifts: Tensor  # [E, 3] Å
    unit_shifts: Tensor  # [E, 3]
    cell: Tensor  # [B, 3, 3]
    pbc: Tensor  # [B, 3] bool
    batch: Tensor  # [T]
    ptr: Tensor  # [B + 1]
    energy: Tensor | None
    forces: Tensor | None
    ids: list[str]

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.numel() - 1)

    @property
    def num_atoms(self) -> Tensor:
        """Atoms per graph ``[B]``."""
        return self.ptr[1:] - self.ptr[:-1]

    def to(self, device: torch.device | str) -> GraphBatch:
        def mv(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            **{
                k: mv(getattr(self, k))
                for k in (
                    "numbers",
                    "positions",
                    "edge_index",
                    "shifts",
                    "unit_shifts",
                    "cell",
                    "pbc",
                    "batch",
                    "ptr",
                    "energy",
                    "forces",
                )
            },
        )

    def tokens(self, x: Tensor | None = None) -> TokenSet:
        """A :class:`TokenSet` over the atoms: ``x`` per-atom features (default: atomic numbers as a column),
        ``pos`` the coordinates."""
        if x is None:
            x = self.numbers.to(self.positions.dtype)[:, None]
        return TokenSet(x, self.batch, self.positions, self.num_graphs)

    def select(self, items: Sequence[int]) -> GraphBatch:
        """A sub-batch with the given graphs (used to split a batch for evaluation)."""
        return collate_graphs([self.graph(i) for i in items])

    def graph(self, i: int) -> AtomicGraph:
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        emask = (self.edge_index[0] >= a) & (self.edge_index[0] < b)
        return AtomicGraph(
            self.numbers[a:b],
            self.positions[a:b],
            self.edge_index[:, emask] - a,
            self.unit_shifts[emask],
            self.cell[i],
            self.pbc[i],
            None if self.energy is None else self.energy[i],
            None if self.forces is None else self.forces[a:b],
            self.ids[i],
        )


def regraph(batch: GraphBatch, r_max: float) -> GraphBatch:
    """The same structures with neighbour lists recomputed for another cutoff (a teacher's ``r_max``)."""
    graphs = []
    for i in range(batch.num_graphs):
        g = batch.graph(i)
        ei, us = neighbour_graph(
            g.positions.detach().cpu().double().numpy(), r_max, g.cell.cpu().double().numpy(), g.pbc.cpu().tolist()
        )
        graphs.append(
            replace(
                g,
                edge_index=torch.as_tensor(ei, device=g.positions.device),
                unit_shifts=torch.as_tensor(us, dtype=g.unit_shifts.dtype, device=g.positions.device),
            )
        )
    return collate_graphs(graphs)


def collate_graphs(graphs: Sequence[AtomicGraph]) -> GraphBatch:
    """Concatenate graphs: node offsets on ``edge_index``, ``shifts = unit_shifts @ cell`` per graph."""
    if len(graphs) == 0:
        raise ValueError("collate_graphs: empty list of graphs")
    device = graphs[0].positions.device
    counts = torch.tensor([g.numbers.numel() for g in graphs], dtype=torch.long, device=device)
    ptr = torch.zeros(len(graphs) + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    edge_index = torch.cat([g.edge_index + ptr[k] for k, g in enumerate(graphs)], dim=1)
    shifts = torch.cat([g.unit_shifts @ g.cell for g in graphs])  # [E, 3] Å
    labelled = all(g.energy is not None and g.forces is not None for g in graphs)
    return GraphBatch(
        numbers=torch.cat([g.numbers for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        edge_index=edge_index,
        shifts=shifts,
        unit_shifts=torch.cat([g.unit_shifts for g in graphs]),
        cell=torch.stack([g.cell for g in graphs]),
        pbc=torch.stack([g.pbc for g in graphs]),
        batch=torch.arange(len(graphs), device=device).repeat_interleave(counts),
        ptr=ptr,
        energy=torch.stack([g.energy for g in graphs]) if labelled else None,
        forces=torch.cat([g.forces for g in graphs]) if labelled else None,
        ids=[g.id for g in graphs],
    )


class AtomsDataset(torch.utils.data.Dataset):
    """Structures turned into neighbour graphs once (in memory).

    Args:
        structures: the structures (validated here).
        r_max: neighbour cutoff in Å (the model's ``r_max``).
        z_table: the model's elements; unknown elements raise a :class:`StructureError`.
        require_labels: training sets need energies and forces.
    """

    def __init__(
        self,
        structures: Sequence[Structure],
        r_max: float,
        z_table: Sequence[int] | None = None,
        require_labels: bool = True,
        name: str = "data set",
    ):
        structures = list(structures)
        for k, s in enumerate(structures):
            if not s.id:
                structures[k] = replace(s, id=f"{name}/{k}")
        validate_structures(structures, z_table=z_table, require_labels=require_labels, name=name)
        self.structures = structures
        self.r_max = float(r_max)
        self.graphs = [AtomicGraph.from_structure(s, self.r_max) for s in structures]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> AtomicGraph:
        return self.graphs[i]

    def subset(self, indices: Sequence[int]) -> AtomsDataset:
        out = object.__new__(AtomsDataset)
        out.structures = [self.structures[i] for i in indices]
        out.graphs = [self.graphs[i] for i in indices]
        out.r_max = self.r_max
        return out

    def batch(self, indices: Sequence[int] | None = None) -> GraphBatch:
        idx = range(len(self)) if indices is None else indices
        return collate_graphs([self.graphs[i] for i in idx])

    # -- on-disk cache -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the processed graphs as safetensors + JSON (no pickles), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        b = collate_graphs(self.graphs)
        tensors = {
            "numbers": b.numbers,
            "positions": b.positions,
            "edge_index": b.edge_index.contiguous(),
            "unit_shifts": b.unit_shifts,
            "cell": b.cell,
            "ptr": b.ptr,
            "edge_ptr": torch.tensor([0] + np.cumsum([g.edge_index.shape[1] for g in self.graphs]).tolist()),
        }
        if b.energy is not None:
            tensors["energy"], tensors["forces"] = b.energy, b.forces
        meta = {
            "r_max": self.r_max,
            "ids": [s.id for s in self.structures],
            "sources": [s.source for s in self.structures],
            "pbc": [list(s.pbc) for s in self.structures],
            "labelled": [s.energy is not None for s in self.structures],
        }
        tmp = path / f"graphs.safetensors.{os.getpid()}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "graphs.safetensors")
        tmpj = path / f"meta.json.{os.getpid()}.tmp"
        tmpj.write_text(json.dumps(meta))
        os.replace(tmpj, path / "meta.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AtomsDataset:
        from safetensors.torch import load_file

        path = Path(path)
        t = load_file(str(path / "graphs.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        ptr, eptr = t["ptr"].tolist(), t["edge_ptr"].tolist()
        out = object.__new__(cls)
        out.r_max = float(meta["r_max"])
        out.structures, out.graphs = [], []
        for k, item_id in enumerate(meta["ids"]):
            a, b, ea, eb = ptr[k], ptr[k + 1], eptr[k], eptr[k + 1]
            e = t["energy"][k] if "energy" in t and meta["labelled"][k] else None
            f = t["forces"][a:b] if e is not None else None
            g = AtomicGraph(
                t["numbers"][a:b],
                t["positions"][a:b],
                t["edge_index"][:, ea:eb] - a,
                t["unit_shifts"][ea:eb],
                t["cell"][k],
                torch.tensor(meta["pbc"][k]),
                e,
                f,
                item_id,
            )
            out.graphs.append(g)
            out.structures.append(
                Structure(
                    g.numbers.numpy(),
                    g.positions.numpy(),
                    None if e is None else float(e),
                    None if f is None else f.numpy(),
                    g.cell.numpy(),
                    tuple(meta["pbc"][k]),
                    item_id,
                    meta["sources"][k],
                )
            )
        return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def split_indices(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Disjoint random index splits, fixed by ``seed`` (by ``fractions`` of ``n`` or explicit ``sizes``)."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    if sizes is None:
        sizes = [int(round(f * n)) for f in fractions]
        sizes[-1] = max(0, n - sum(sizes[:-1]))
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} ask for {sum(sizes)} structures but the set has {n}")
    out, start = [], 0
    for s in sizes:
        out.append(sorted(perm[start : start + s]))
        start += s
    return out


def load_dataset(
    path: str | os.PathLike,
    r_max: float,
    z_table: Sequence[int] | None = None,
    require_labels: bool = True,
    cache_dir: str | os.PathLike | None = None,
    reader: Callable[[Path], list[Structure]] | None = None,
) -> AtomsDataset:
    """Read a file into an :class:`AtomsDataset`, through an on-disk cache keyed by the file's content and
    ``r_max`` (a data set is processed once)."""
    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: data file not found; run scripts/make_molecular_data.py or fix the path")
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{_file_digest(path)}|{float(r_max)}|{getattr(reader, '__name__', '')}".encode())
        cache = Path(cache_dir) / f"{_stem(path)}-{key.hexdigest()[:12]}"
        if (cache / "meta.json").exists() and (cache / "graphs.safetensors").exists():
            ds = AtomsDataset.load(cache)
            validate_structures(
                ds.structures, z_table=z_table, require_labels=require_labels, min_distance=0, name=str(path)
            )
            return ds
    if reader is None:
        suffix = path.suffix.lower()
        if suffix in (".sdf", ".mol"):
            reader = read_sdf
        elif suffix in (".pdb", ".cif", ".bcif", ".mmcif"):
            reader = read_biomolecule
        else:
            reader = read_structures
    ds = AtomsDataset(reader(path), r_max=r_max, z_table=z_table, require_labels=require_labels, name=str(path))
    if cache is not None:
        ds.save(cache)
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Labelling and geometry sampling
# ---------------------------------------------------------------------------------------------------------------
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


def _resolve_calc(calculator):
    return make_calculator(calculator) if isinstance(calculator, str) else calculator


def label_structures(structures: Sequence[Structure], calculator: Any = "gfn2") -> list[Structure]:
    """Energies and forces from an ASE calculator (name or object, or a zero-arg factory) for every structure."""
    calc = (
        calculator()
        if callable(calculator) and not hasattr(calculator, "get_potential_energy")
        else _resolve_calc(calculator)
    )
    out = []
    for k, s in enumerate(structures):
        atoms = s.to_atoms()
        atoms.calc = calc
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces())
        except Exception as err:
            raise StructureError(f"{s.source or s.id or k}: labelling failed ({err})") from err
        out.append(replace(s, energy=energy, forces=forces))
    return out


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

    calc = _resolve_calc(calculator)
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
    atoms.calc = _resolve_calc(calculator)
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
