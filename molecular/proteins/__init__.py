"""Proteins: structures in, residue-level token sets, local protein environments, a SLAE-style autoencoder and a
partially latent (La-Proteina-style) flow. See ``docs/proteins.md``."""

from .build import build_peptide, ccd_residue_protein, secondary_structure_peptide
from .constants import ATOM37, NUM_RESIDUE_TYPES, RESIDUES, residue_type
from .io import ProteinStructure, ReadOptions, read_protein, read_proteins, write_cif, write_pdb
from .residues import (
    ProteinBatch,
    backbone_torsions,
    ca_frames,
    collate_proteins,
    kabsch_rmsd,
    pool_residues,
    residue_frames,
    to_atom37,
)

__all__ = [
    "ATOM37",
    "RESIDUES",
    "NUM_RESIDUE_TYPES",
    "residue_type",
    "ReadOptions",
    "ProteinStructure",
    "read_protein",
    "read_proteins",
    "write_pdb",
    "write_cif",
    "build_peptide",
    "secondary_structure_peptide",
    "ccd_residue_protein",
    "ProteinBatch",
    "collate_proteins",
    "pool_residues",
    "to_atom37",
    "residue_frames",
    "ca_frames",
    "backbone_torsions",
    "kabsch_rmsd",
]
