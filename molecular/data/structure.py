"""The atomic structure type and its validation: empty sets, NaN coordinates, overlapping atoms, unknown elements,
missing or malformed labels, duplicate ids. Units follow ASE: Å, eV, eV/Å."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["StructureError", "Structure", "validate_structures"]


class StructureError(ValueError):
    """Bad atomistic input; the message names the file (or source), the item and the fix."""


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
        if self.id:
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


def stem(path: str | os.PathLike) -> str:
    """A file's name without any extension (``md.extxyz.gz`` -> ``md``): the prefix of its structures' ids."""
    return Path(path).name.split(".")[0]


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
