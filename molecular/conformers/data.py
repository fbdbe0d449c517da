"""Conformer data: molecules from SMILES with reference ensembles, split by molecule, batched padding-free.

Each molecule is featurised once from its rdkit graph (element, formal charge, aromaticity, hybridisation,
ring membership; bonds with their orders), the conditioning ET-Flow and torsional diffusion use. A data item is
one (molecule, reference conformer) pair; the train/val split is by molecule, so no validation molecule is
ever seen in training (GEOM splits of torsional diffusion). Batches are :class:`molecular.data.GraphBatch` with
the molecular graph set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rdkit import Chem
from torch import Tensor

from molecular.data.graphs import GraphBatch

from .generate import SUPPORTED_ELEMENTS, mol_from_smiles, reference_ensemble

__all__ = [
    "NUM_ATOM_FEATURES",
    "NUM_BOND_TYPES",
    "MoleculeRecord",
    "ConformerDataset",
    "featurize",
    "collate_molecules",
    "conformer_datamodule",
    "QUICKSTART_SMILES",
    "peptide_smiles",
]

_ELEMENT_INDEX = {s: i for i, s in enumerate(SUPPORTED_ELEMENTS)}
# atomic number of each SUPPORTED_ELEMENTS index: numbers = _ATOMIC_NUMBERS[atom_types]
_ATOMIC_NUMBERS = torch.tensor([Chem.GetPeriodicTable().GetAtomicNumber(s) for s in SUPPORTED_ELEMENTS])
_CHARGES = (-1, 0, 1)
_HYBRID = (Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3)
# element one-hot | charge one-hot | aromatic | hybridisation one-hot (sp, sp2, sp3, other) | in ring
NUM_ATOM_FEATURES = len(SUPPORTED_ELEMENTS) + len(_CHARGES) + 1 + len(_HYBRID) + 1 + 1
# 0 = no bond (pairs of the fully connected graph), 1 single, 2 double, 3 triple, 4 aromatic
NUM_BOND_TYPES = 5
_BOND_INDEX = {
    Chem.BondType.SINGLE: 1,
    Chem.BondType.DOUBLE: 2,
    Chem.BondType.TRIPLE: 3,
    Chem.BondType.AROMATIC: 4,
}

# QM9-size molecules (at most 9 heavy atoms, H C N O F) with rotatable bonds and rings: the quick start's set.
QUICKSTART_SMILES: tuple[str, ...] = (
    "CCO",
    "CCCO",
    "CC(C)O",
    "CCOC",
    "CCCN",
    "OCCO",
    "CC(=O)OC",
    "CCC(=O)N",
    "CCOCC",
    "NCCO",
    "CCCC",
    "CCCCO",
    "CC(C)CO",
    "COCCO",
    "CCNCC",
    "CC(O)CO",
    "OCC(O)CO",
    "CCC(C)O",
    "CC(C)OC",
    "NCC(=O)O",
    "CC(N)C(=O)O",
    "COC(=O)CN",
    "CCOC(=O)C",
    "CC(=O)NCC",
    "OCCCO",
    "NCCCN",
    "CCCCC",
    "CCCOC",
    "COCCOC",
    "CCC(=O)OC",
    "C1CCOC1",
    "C1CCNC1",
    "CC1CCCO1",
    "OC1CCCC1",
    "c1ccoc1",
    "Cc1ccco1",
    "c1ccncc1",
    "Cc1ccncc1",
    "OCc1ccco1",
    "CC(=O)c1ccco1",
    "FCCO",
    "FC(F)CO",
    "CC(F)CO",
    "N#CCCO",
    "CC#CCO",
    "C=CCOC",
    "C=CCCO",
    "OCC#N",
)


@dataclass
class MoleculeRecord:
    """One molecule: SMILES, the rdkit template (explicit H), features, and its reference conformers."""

    smiles: str
    mol: Chem.Mol
    atom_types: Tensor  # [N] long, index into SUPPORTED_ELEMENTS
    atom_features: Tensor  # [N, NUM_ATOM_FEATURES]
    bond_index: Tensor  # [2, 2*N_bonds] long, both directions
    bond_types: Tensor  # [2*N_bonds] long in 1..4
    conformers: Tensor  # [K, N, 3] reference coordinates in Å
    energies: Tensor | None = None  # [K] GFN2-xTB energies in eV when relaxed

    @property
    def num_atoms(self) -> int:
        return int(self.atom_types.shape[0])


def featurize(mol: Chem.Mol, name: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(atom_types[N], atom_features[N, F], bond_index[2, 2B], bond_types[2B])`` of an explicit-H molecule."""
    types, feats = [], []
    for a in mol.GetAtoms():
        sym = a.GetSymbol()
        if sym not in _ELEMENT_INDEX:
            raise ValueError(
                f"molecule {name or Chem.MolToSmiles(mol)!r}: element {sym!r} is not supported "
                f"(supported: {list(SUPPORTED_ELEMENTS)}); drop the molecule or extend SUPPORTED_ELEMENTS"
            )
        if a.GetFormalCharge() not in _CHARGES:
            raise ValueError(
                f"molecule {name or Chem.MolToSmiles(mol)!r}: formal charge {a.GetFormalCharge()} on atom "
                f"{a.GetIdx()} is outside {_CHARGES}; neutralise the molecule first"
            )
        f = np.zeros(NUM_ATOM_FEATURES, dtype=np.float32)
        f[_ELEMENT_INDEX[sym]] = 1
        o = len(SUPPORTED_ELEMENTS)
        f[o + _CHARGES.index(a.GetFormalCharge())] = 1
        o += len(_CHARGES)
        f[o] = float(a.GetIsAromatic())
        o += 1
        hyb = a.GetHybridization()
        f[o + (_HYBRID.index(hyb) if hyb in _HYBRID else len(_HYBRID))] = 1
        o += len(_HYBRID) + 1
        f[o] = float(a.IsInRing())
        types.append(_ELEMENT_INDEX[sym])
        feats.append(f)
    src, dst, bt = [], [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        k = _BOND_INDEX.get(b.GetBondType(), 1)
        src += [i, j]
        dst += [j, i]
        bt += [k, k]
    return (
        torch.tensor(types, dtype=torch.long),
        torch.from_numpy(np.stack(feats)),
        torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        torch.tensor(bt, dtype=torch.long),
    )


def collate_molecules(items: Sequence[tuple[MoleculeRecord, Tensor, int, int]]) -> GraphBatch:
    """Collate ``(record, pos[N, 3], mol_index, conformer_index)`` items into one :class:`GraphBatch` with the
    molecular graph (atom types and features, bonds) and no radius graph (see :meth:`GraphBatch.radius_graph`)."""
    if not items:
        raise ValueError("cannot collate an empty list of molecules")
    offset = 0
    types, feats, pos, batch, bidx, btyp, midx, smiles, ids = [], [], [], [], [], [], [], [], []
    for g, (rec, p, mi, ci) in enumerate(items):
        n = rec.num_atoms
        types.append(rec.atom_types)
        feats.append(rec.atom_features)
        pos.append(p.float())
        batch.append(torch.full((n,), g, dtype=torch.long))
        bidx.append(rec.bond_index + offset)
        btyp.append(rec.bond_types)
        midx.append(mi)
        smiles.append(rec.smiles)
        ids.append(f"{rec.smiles}#{ci}")
        offset += n
    atom_types = torch.cat(types)
    counts = torch.tensor([rec.num_atoms for rec, *_ in items], dtype=torch.long)
    ptr = torch.zeros(len(items) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(counts, 0)
    return GraphBatch(
        numbers=_ATOMIC_NUMBERS[atom_types],
        positions=torch.cat(pos),
        batch=torch.cat(batch),
        ptr=ptr,
        ids=ids,
        atom_types=atom_types,
        atom_features=torch.cat(feats),
        bond_index=torch.cat(bidx, 1),
        bond_types=torch.cat(btyp),
        mol_index=torch.tensor(midx, dtype=torch.long),
        smiles=smiles,
    )


class ConformerDataset(torch.utils.data.Dataset):
    """All (molecule, reference conformer) pairs of a list of :class:`MoleculeRecord`."""

    def __init__(self, records: Sequence[MoleculeRecord]):
        if not records:
            raise ValueError("ConformerDataset got no molecules: give at least one SMILES")
        self.records = list(records)
        self.index = [(m, k) for m, r in enumerate(self.records) for k in range(r.conformers.shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[MoleculeRecord, Tensor, int, int]:
        m, k = self.index[i]
        return self.records[m], self.records[m].conformers[k], m, k

    @classmethod
    def from_smiles(
        cls,
        smiles: Sequence[str],
        num_confs: int = 10,
        max_confs: int | None = None,
        relax: bool = False,
        prune_rmsd: float = 0.25,
        seed: int = 0,
    ) -> ConformerDataset:
        return cls([make_record(s, num_confs, max_confs, relax, prune_rmsd, seed) for s in smiles])


def make_record(
    smiles: str,
    num_confs: int = 10,
    max_confs: int | None = None,
    relax: bool = False,
    prune_rmsd: float = 0.25,
    seed: int = 0,
) -> MoleculeRecord:
    """Parse, featurise and build the reference ensemble of one molecule (see ``reference_ensemble``)."""
    template = mol_from_smiles(smiles)
    types, feats, bidx, btyp = featurize(template, smiles)
    confs, energies = reference_ensemble(smiles, num_confs, seed, relax, prune_rmsd, max_confs)
    pos = torch.tensor(np.stack([c.GetConformer().GetPositions() for c in confs]), dtype=torch.float32)
    return MoleculeRecord(
        smiles,
        template,
        types,
        feats,
        bidx,
        btyp,
        pos,
        None if energies is None else torch.tensor(energies, dtype=torch.float64),
    )


def peptide_smiles(sequence: str) -> str:
    """SMILES of a linear peptide from its one-letter sequence (rdkit's sequence parser; neutral termini).

    Short peptides built this way (and embedded with ETKDG) are the offline protein fragments the local autoencoder
    trains on; real protein structures come from PDB/mmCIF files through ``molecular.data.read_biomolecule``.
    """
    mol = Chem.MolFromSequence(sequence) if sequence and sequence.isalpha() else None
    if mol is None:
        raise ValueError(f"invalid peptide sequence {sequence!r}: use one-letter amino-acid codes, e.g. 'GAS'")
    return Chem.MolToSmiles(mol)


def conformer_datamodule(
    smiles: Sequence[str] | None = None,
    sequences: Sequence[str] = (),
    val_smiles: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    num_confs: int = 10,
    max_confs: int | None = 8,
    relax: bool = False,
    prune_rmsd: float = 0.25,
    seed: int = 0,
):
    """A ``unirep.train.DataModule`` of conformer ensembles, split by molecule.

    ``smiles`` defaults to :data:`QUICKSTART_SMILES`. ``sequences`` adds peptides (one-letter codes,
    :func:`peptide_smiles`) to ``smiles``. ``val_smiles`` fixes the held-out molecules; otherwise ``val_fraction``
    of ``smiles`` (at least one) is held out at random with ``seed``. ``info`` carries the element list and the
    feature sizes models are built with.
    """
    from unirep.train import DataModule

    smiles = list(QUICKSTART_SMILES if smiles is None else smiles) + [peptide_smiles(q) for q in sequences]
    if val_smiles is None:
        rng = random.Random(seed)
        order = list(range(len(smiles)))
        rng.shuffle(order)
        n_val = max(1, int(round(val_fraction * len(smiles)))) if len(smiles) > 1 else 0
        val = [smiles[i] for i in order[:n_val]]
        train = [smiles[i] for i in order[n_val:]]
    else:
        val = list(val_smiles)
        overlap = set(val) & set(smiles)
        if overlap:
            raise ValueError(f"molecules {sorted(overlap)} are in both the train and val lists: split by molecule")
        train = smiles
    kw = dict(num_confs=num_confs, max_confs=max_confs, relax=relax, prune_rmsd=prune_rmsd, seed=seed)
    train_ds = ConformerDataset.from_smiles(train, **kw)
    val_ds = ConformerDataset.from_smiles(val, **kw) if val else None
    info = {
        "elements": list(SUPPORTED_ELEMENTS),
        "num_atom_features": NUM_ATOM_FEATURES,
        "num_bond_types": NUM_BOND_TYPES,
    }
    return DataModule(train_ds, val_ds, collate_fn=collate_molecules, info=info)
