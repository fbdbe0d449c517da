"""Residue vocabulary and the atom37 layout (AlphaFold's ``residue_constants``: 37 heavy-atom slots per residue).

Every residue is a row of 37 slots, one per heavy-atom name that occurs in the 20 canonical amino acids; a mask
says which slots a residue type has. Structures, autoencoder targets and metrics share this one layout, so a
per-residue all-atom quantity is a ``[R, 37, k]`` tensor plus a ``[R, 37]`` mask. Backbone torsions and chi1
atoms are named here too.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "RESIDUES",
    "ONE_LETTER",
    "UNK",
    "NUM_RESIDUE_TYPES",
    "ATOM37",
    "ATOM37_INDEX",
    "BACKBONE",
    "RESIDUE_ATOMS",
    "ATOM37_MASK",
    "CHI1_ATOM",
    "WATERS",
    "residue_type",
]

# the 20 canonical amino acids, alphabetical by three-letter code (AlphaFold's restype order is by one-letter)
RESIDUES: tuple[str, ...] = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
)  # fmt: skip
ONE_LETTER = dict(zip(RESIDUES, "ARNDCQEGHILKMFPSTWYV", strict=True))
UNK = len(RESIDUES)  # index of any other residue (non-canonical amino acids keep their atoms, type UNK)
NUM_RESIDUE_TYPES = UNK + 1

ATOM37: tuple[str, ...] = (
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2", "OD1",
    "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2", "OH", "CZ",
    "CZ2", "CZ3", "NZ", "OXT",
)  # fmt: skip
ATOM37_INDEX = {name: k for k, name in enumerate(ATOM37)}
BACKBONE: tuple[str, ...] = ("N", "CA", "C", "O")

# heavy atoms of each residue type (OXT, the C-terminal oxygen, is allowed for every type but required by none)
RESIDUE_ATOMS: dict[str, tuple[str, ...]] = {
    "ALA": ("N", "CA", "C", "O", "CB"),
    "ARG": ("N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "ASN": ("N", "CA", "C", "O", "CB", "CG", "OD1", "ND2"),
    "ASP": ("N", "CA", "C", "O", "CB", "CG", "OD1", "OD2"),
    "CYS": ("N", "CA", "C", "O", "CB", "SG"),
    "GLN": ("N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "NE2"),
    "GLU": ("N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "OE2"),
    "GLY": ("N", "CA", "C", "O"),
    "HIS": ("N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "ILE": ("N", "CA", "C", "O", "CB", "CG1", "CG2", "CD1"),
    "LEU": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2"),
    "LYS": ("N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ"),
    "MET": ("N", "CA", "C", "O", "CB", "CG", "SD", "CE"),
    "PHE": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "PRO": ("N", "CA", "C", "O", "CB", "CG", "CD"),
    "SER": ("N", "CA", "C", "O", "CB", "OG"),
    "THR": ("N", "CA", "C", "O", "CB", "OG1", "CG2"),
    "TRP": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"),
    "TYR": ("N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "VAL": ("N", "CA", "C", "O", "CB", "CG1", "CG2"),
}

# [21, 37]: slots a residue type fills (UNK: the backbone only)
ATOM37_MASK = np.zeros((NUM_RESIDUE_TYPES, len(ATOM37)), dtype=bool)
for _k, _res in enumerate(RESIDUES):
    ATOM37_MASK[_k, [ATOM37_INDEX[a] for a in RESIDUE_ATOMS[_res]]] = True
ATOM37_MASK[UNK, [ATOM37_INDEX[a] for a in BACKBONE]] = True

# the gamma atom of chi1 = N-CA-CB-X (ALA and GLY have no chi1)
CHI1_ATOM: dict[str, str] = {
    "ARG": "CG", "ASN": "CG", "ASP": "CG", "CYS": "SG", "GLN": "CG", "GLU": "CG", "HIS": "CG", "ILE": "CG1",
    "LEU": "CG", "LYS": "CG", "MET": "CG", "PHE": "CG", "PRO": "CG", "SER": "OG", "THR": "OG1", "TRP": "CG",
    "TYR": "CG", "VAL": "CG1",
}  # fmt: skip

WATERS = frozenset({"HOH", "WAT", "DOD", "H2O", "SOL", "TIP", "TIP3", "TIP3P", "SPC"})

_TYPE_INDEX = {r: k for k, r in enumerate(RESIDUES)}
_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "CYX": "CYS",
            "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "MSE": "MET"}  # fmt: skip


def residue_type(name: str) -> int:
    """Index of a residue name in :data:`RESIDUES` (force-field protonation names map to their residue);
    :data:`UNK` for anything else."""
    name = str(name).strip().upper()
    return _TYPE_INDEX.get(_ALIASES.get(name, name), UNK)
