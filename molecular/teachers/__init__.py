"""Frozen atomistic teachers (MACE files, the project's foundation MACE, hook adapters for other models).

Every teacher follows one interface: ``encode``, ``dim``, ``forward_intermediates(sample, indices)`` (0 = embedding,
k = layer k), ``feature_dim``, ``num_layers``, ``item_digests`` (content keys), ``elements`` and ``invariant``.
"""

from molecular.teachers.base import (
    AtomisticEncoder,
    AtomsFunctionEncoder,
    HookEncoder,
    batch_to_atoms,
    check_teacher_elements,
    structure_digests,
    teacher_elements,
)
from molecular.teachers.mace import MACEEncoder, load_mace_model, mace_teacher, random_mace_teacher, save_mace_model

__all__ = [
    "AtomisticEncoder",
    "HookEncoder",
    "AtomsFunctionEncoder",
    "batch_to_atoms",
    "check_teacher_elements",
    "structure_digests",
    "teacher_elements",
    "MACEEncoder",
    "load_mace_model",
    "save_mace_model",
    "mace_teacher",
    "random_mace_teacher",
]
