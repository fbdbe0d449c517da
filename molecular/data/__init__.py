"""Atomistic data: structures, readers, validation, neighbour graphs, batching, data sets, labels, sampling.

- :mod:`~molecular.data.structure`: :class:`Structure` and :func:`validate_structures` (:class:`StructureError`);
- :mod:`~molecular.data.readers`: ASE, rdkit (SMILES, SDF) and biotite (PDB, mmCIF) readers, :func:`write_extxyz`;
- :mod:`~molecular.data.graphs`: neighbour lists and the one batch type, :class:`GraphBatch`;
- :mod:`~molecular.data.dataset`: :class:`AtomsDataset`, :func:`load_dataset`, splits;
- :mod:`~molecular.data.shards`: :class:`ShardedAtomsDataset`, sets larger than RAM in safetensors shards;
- :mod:`~molecular.data.labelling`: xTB / MMFF labels, the least-squares E0 fit;
- :mod:`~molecular.data.sampling`: displacements, normal modes, Langevin MD, the data sets made on first use.

Units follow ASE: Å, eV, eV/Å.
"""

from .dataset import AtomsDataset, load_dataset, split_indices, train_val_split
from .graphs import AtomicGraph, GraphBatch, collate_graphs, neighbour_graph, regraph, species_index, z_lookup
from .labelling import MMFFCalculator, fit_atomic_energies, label_structures, make_calculator, resolve_calculator
from .readers import (
    ccd_residue,
    mol_structures,
    read_biomolecule,
    read_sdf,
    read_structures,
    structures_from_smiles,
    write_extxyz,
)
from .sampling import (
    FALLBACK_SMILES,
    NARROW,
    broad_structures,
    ensure_broad_set,
    ensure_md_set,
    generate_set,
    langevin_md,
    normal_mode_samples,
    qm9_structures,
    thermal_displacements,
)
from .shards import ShardedAtomsDataset, convert_to_shards, write_shards
from .structure import Structure, StructureError, validate_structures

__all__ = [
    "StructureError",
    "Structure",
    "validate_structures",
    "read_structures",
    "structures_from_smiles",
    "read_sdf",
    "read_biomolecule",
    "ccd_residue",
    "mol_structures",
    "write_extxyz",
    "neighbour_graph",
    "AtomicGraph",
    "GraphBatch",
    "collate_graphs",
    "regraph",
    "z_lookup",
    "species_index",
    "AtomsDataset",
    "ShardedAtomsDataset",
    "convert_to_shards",
    "write_shards",
    "split_indices",
    "load_dataset",
    "train_val_split",
    "make_calculator",
    "resolve_calculator",
    "MMFFCalculator",
    "label_structures",
    "fit_atomic_energies",
    "thermal_displacements",
    "normal_mode_samples",
    "langevin_md",
    "NARROW",
    "FALLBACK_SMILES",
    "ensure_md_set",
    "qm9_structures",
    "broad_structures",
    "ensure_broad_set",
    "generate_set",
]
