"""Frozen atomistic teachers (MACE files, the project's foundation MACE, hook adapters for other models)."""

from molecular.teachers.base import AtomisticEncoder, AtomsFunctionEncoder, HookEncoder, batch_to_atoms
from molecular.teachers.mace import MACEEncoder, load_mace_model, mace_teacher, random_mace_teacher, save_mace_model

__all__ = [
    "AtomisticEncoder",
    "HookEncoder",
    "AtomsFunctionEncoder",
    "batch_to_atoms",
    "MACEEncoder",
    "load_mace_model",
    "save_mace_model",
    "mace_teacher",
    "random_mace_teacher",
]
