"""Conformer ensembles, metrics (COV/MAT as torsional diffusion / ET-Flow), validity checks and writers."""

from .data import (
    NUM_ATOM_FEATURES,
    NUM_BOND_TYPES,
    QUICKSTART_SMILES,
    ConformerDataset,
    MoleculeRecord,
    collate_molecules,
    conformer_datamodule,
    featurize,
    make_record,
    peptide_smiles,
)
from .ensembles import map_onto_template, read_ensembles, record_from_conformers, write_ensembles
from .generate import (
    SUPPORTED_ELEMENTS,
    check_elements,
    conformer_mols,
    etkdg_conformers,
    mol_from_smiles,
    prune_conformers,
    reference_ensemble,
    xtb_energy,
    xtb_relax,
)
from .io import write_extxyz, write_sdf
from .metrics import DELTA_DRUGS, DELTA_QM9, aggregate_stats, best_rmsd, coverage_stats, default_delta, rmsd_matrix
from .stereo import correct_chirality, keeps_stereo, perceived_stereo, specified_stereo
from .validity import keeps_bond_graph, sanitises_to_same, validity_stats, with_coordinates

__all__ = [
    "NUM_ATOM_FEATURES",
    "NUM_BOND_TYPES",
    "QUICKSTART_SMILES",
    "SUPPORTED_ELEMENTS",
    "DELTA_DRUGS",
    "DELTA_QM9",
    "ConformerDataset",
    "MoleculeRecord",
    "aggregate_stats",
    "best_rmsd",
    "check_elements",
    "collate_molecules",
    "correct_chirality",
    "conformer_datamodule",
    "conformer_mols",
    "coverage_stats",
    "default_delta",
    "etkdg_conformers",
    "featurize",
    "keeps_bond_graph",
    "keeps_stereo",
    "make_record",
    "map_onto_template",
    "mol_from_smiles",
    "peptide_smiles",
    "perceived_stereo",
    "prune_conformers",
    "read_ensembles",
    "record_from_conformers",
    "reference_ensemble",
    "rmsd_matrix",
    "sanitises_to_same",
    "specified_stereo",
    "validity_stats",
    "with_coordinates",
    "write_ensembles",
    "write_extxyz",
    "write_sdf",
    "xtb_energy",
    "xtb_relax",
]
