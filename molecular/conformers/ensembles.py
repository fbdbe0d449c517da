"""Reference ensembles users bring: SDF or extxyz grouped by SMILES, GEOM's msgpack; written back as grouped SDF.

A conformer benchmark needs, per molecule, one atom order (the rdkit template the model is conditioned on) and
several conformers in that order. Sources:

- **SDF** (``.sdf``/``.sdf.gz``): one record per conformer; records are grouped by the SD property ``smiles`` (or
  ``key``), else by the canonical isomeric SMILES of the record. Records of one group may list atoms in different
  orders: each is mapped onto the first record's order by a graph match.
- **extxyz** (``.extxyz``/``.xyz``): one frame per conformer, ``smiles`` in each frame's info; bonds come from the
  SMILES and atoms are mapped onto it by connectivity perceived from the coordinates.
- **GEOM msgpack** (``qm9_crude.msgpack``, ``drugs_crude.msgpack``; Axelrod & Gomez-Bombarelli 2022): a stream of
  ``{smiles: {"conformers": [{"xyz": [[Z, x, y, z], ...], "totalenergy": Eh, ...}], ...}}`` dictionaries, read with
  ``msgpack`` (optional). GEOM's ``rd_mols`` *pickles* are never opened: unpickling runs arbitrary code.

When a SMILES leaves stereocentres unspecified, the template takes the stereo of the group's first conformer
(perceived from its coordinates), so that every reference, and the stereo checks, agree on one stereoisomer.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds

from .data import MoleculeRecord, featurize
from .generate import mol_from_smiles

__all__ = [
    "map_onto_template",
    "template_with_stereo",
    "record_from_conformers",
    "read_ensembles",
    "write_ensembles",
    "HARTREE_EV",
    "ensemble_datamodule",
]

HARTREE_EV = 27.211386245988  # CODATA 2018; GEOM stores energies in Hartree
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")


def _plain(mol: Chem.Mol) -> Chem.Mol:
    """Connectivity only: every bond single, nothing aromatic, no charges (the graph a coordinate set fixes)."""
    rw = Chem.RWMol(mol)
    for b in rw.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in rw.GetAtoms():
        a.SetIsAromatic(False)
        a.SetFormalCharge(0)
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
    m = rw.GetMol()
    m.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(m)
    return m


def _from_xyz(numbers: Sequence[int], pos: np.ndarray) -> Chem.Mol:
    rw = Chem.RWMol()
    for z in numbers:
        rw.AddAtom(Chem.Atom(int(z)))
    conf = Chem.Conformer(len(numbers))
    for i, p in enumerate(np.asarray(pos, dtype=float)):
        conf.SetAtomPosition(i, p.tolist())
    m = rw.GetMol()
    m.AddConformer(conf, assignId=True)
    rdDetermineBonds.DetermineConnectivity(m)
    return m


def map_onto_template(template: Chem.Mol, numbers: Sequence[int], pos: np.ndarray, name: str = "") -> np.ndarray:
    """Coordinates ``pos[N, 3]`` (atoms ``numbers``, any order) reordered into the template's atom order.

    The connectivity perceived from the coordinates must equal the template's bond graph (same elements and bonds);
    otherwise the structure is not a conformer of this molecule and a ``ValueError`` names it.
    """
    pos = np.asarray(pos, dtype=float)
    if len(numbers) != template.GetNumAtoms():
        raise ValueError(
            f"{name or 'structure'}: {len(numbers)} atoms but the SMILES has {template.GetNumAtoms()} (with hydrogens)"
        )
    probe = _from_xyz(numbers, pos)
    match = _plain(probe).GetSubstructMatch(_plain(template))  # match[template atom] = probe atom
    if len(match) != template.GetNumAtoms() or probe.GetNumBonds() != template.GetNumBonds():
        raise ValueError(
            f"{name or 'structure'}: the bonds perceived from its coordinates do not form the SMILES's graph; it is "
            "not a conformer of this molecule (or a distorted one): drop it"
        )
    return pos[list(match)]


def template_with_stereo(smiles: str, first: np.ndarray | None = None) -> Chem.Mol:
    """The explicit-H template of ``smiles``; unspecified stereo is taken from ``first[N, 3]`` (template order)."""
    template = mol_from_smiles(smiles)
    if first is None:
        return template
    from .stereo import specified_stereo
    from .validity import with_coordinates

    probe = with_coordinates(template, first)
    Chem.AssignStereochemistryFrom3D(probe, replaceExistingTags=False)
    if len(specified_stereo(probe)) > len(specified_stereo(template)):
        probe.RemoveAllConformers()
        return probe
    return template


def record_from_conformers(
    smiles: str, conformers: Sequence[np.ndarray], energies: Sequence[float] | None = None, template=None
) -> MoleculeRecord:
    """A :class:`MoleculeRecord` from conformers already in the template's atom order (Å; energies in eV)."""
    if not conformers:
        raise ValueError(f"molecule {smiles!r} has no conformers")
    template = template if template is not None else template_with_stereo(smiles, conformers[0])
    types, feats, bidx, btyp = featurize(template, smiles)
    pos = torch.tensor(np.stack(conformers), dtype=torch.float32)
    en = None if energies is None else torch.tensor(list(energies), dtype=torch.float64)
    iso = Chem.MolToSmiles(Chem.RemoveHs(template))
    return MoleculeRecord(iso, template, types, feats, bidx, btyp, pos, en)


def _groups_sdf(path: Path, key: str) -> OrderedDict[str, list[Chem.Mol]]:
    opener = gzip.open if path.suffix == ".gz" else open
    groups: OrderedDict[str, list[Chem.Mol]] = OrderedDict()
    with opener(path, "rb") as fh:
        for i, mol in enumerate(Chem.ForwardSDMolSupplier(fh, removeHs=False)):
            if mol is None:
                raise ValueError(f"{path}: record {i} could not be parsed by rdkit")
            k = mol.GetProp(key) if mol.HasProp(key) else Chem.MolToSmiles(Chem.RemoveHs(mol))
            groups.setdefault(k, []).append(mol)
    return groups


def _energy(mol: Chem.Mol) -> float | None:
    for prop in ("energy_eV", "energy"):
        if mol.HasProp(prop):
            return float(mol.GetProp(prop))
    return None


def _records_sdf(path: Path, key: str) -> list[MoleculeRecord]:
    out = []
    for smi, mols in _groups_sdf(path, key).items():
        template = mols[0]
        if Chem.AddHs(template).GetNumAtoms() != template.GetNumAtoms():
            raise ValueError(f"{path}: molecule {smi!r} has implicit hydrogens; conformer files need explicit ones")
        numbers = [a.GetAtomicNum() for a in template.GetAtoms()]
        confs = [template.GetConformer().GetPositions()]
        for j, m in enumerate(mols[1:], start=1):
            nums = [a.GetAtomicNum() for a in m.GetAtoms()]
            same = nums == numbers and all(
                template.GetBondBetweenAtoms(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) is not None for b in m.GetBonds()
            )
            pos = m.GetConformer().GetPositions()
            confs.append(pos if same else map_onto_template(template, nums, pos, f"{path}:{smi}#{j}"))
        en = [_energy(m) for m in mols]
        t = Chem.Mol(template)
        t.RemoveAllConformers()
        out.append(record_from_conformers(smi, confs, None if None in en else en, template=t))
    return out


def _records_extxyz(path: Path, key: str) -> list[MoleculeRecord]:
    from ase.io import iread

    groups: OrderedDict[str, list] = OrderedDict()
    for i, atoms in enumerate(iread(str(path), index=":")):
        smi = atoms.info.get(key)
        if smi is None:
            raise ValueError(f"{path}: frame {i} has no {key!r} in its info line; write one SMILES per frame")
        groups.setdefault(str(smi), []).append(atoms)
    out = []
    for smi, frames in groups.items():
        base = mol_from_smiles(smi)
        confs = [map_onto_template(base, a.numbers, a.positions, f"{path}:{smi}#{j}") for j, a in enumerate(frames)]
        en = [a.info.get("energy_eV", a.info.get("energy")) for a in frames]
        out.append(record_from_conformers(smi, confs, None if None in en else [float(e) for e in en]))
    return out


def _geom_items(path: Path) -> Iterable[tuple[str, dict]]:
    try:
        import msgpack
    except ImportError as err:
        raise ImportError(f"reading GEOM's {path.name} needs msgpack: pip install msgpack") from err
    with open(path, "rb") as fh:
        for chunk in msgpack.Unpacker(fh, raw=False):
            yield from chunk.items()


def _records_geom(path: Path, max_molecules: int | None, max_confs: int | None) -> list[MoleculeRecord]:
    out = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for smi, entry in _geom_items(path):
            confs = entry.get("conformers") or []
            try:
                base = mol_from_smiles(smi)
                arr = [np.asarray(c["xyz"], dtype=float) for c in confs[: max_confs or None]]
                pos = [map_onto_template(base, a[:, 0].astype(int), a[:, 1:], smi) for a in arr]
                en = [float(c["totalenergy"]) * HARTREE_EV for c in confs[: len(pos)]]
                out.append(record_from_conformers(smi, pos, en))
            except ValueError:  # unsupported element, charge, or a conformer whose graph changed: GEOM has a few
                continue
            if max_molecules is not None and len(out) >= max_molecules:
                break
    finally:
        RDLogger.EnableLog("rdApp.*")
    return out


def read_ensembles(
    path: str | Path, key: str = "smiles", max_molecules: int | None = None, max_confs: int | None = None
) -> list[MoleculeRecord]:
    """Reference ensembles of a file: SDF, extxyz (grouped by ``key``) or GEOM msgpack; one record per molecule."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(_PICKLE_SUFFIXES):
        raise ValueError(
            f"{path}: pickles are never loaded (unpickling runs arbitrary code); use GEOM's msgpack files "
            "(qm9_crude.msgpack / drugs_crude.msgpack) or export the conformers as SDF"
        )
    if not path.exists():
        raise FileNotFoundError(f"no ensemble file at {path}")
    if name.endswith((".sdf", ".sdf.gz")):
        recs = _records_sdf(path, key)
    elif name.endswith((".extxyz", ".xyz")):
        recs = _records_extxyz(path, key)
    elif name.endswith(".msgpack"):
        return _records_geom(path, max_molecules, max_confs)
    else:
        raise ValueError(f"{path}: unknown ensemble format; use .sdf, .extxyz/.xyz (grouped by {key!r}) or .msgpack")
    if max_confs is not None:
        for r in recs:
            r.conformers = r.conformers[:max_confs]
            r.energies = None if r.energies is None else r.energies[:max_confs]
    return recs[:max_molecules] if max_molecules is not None else recs


def write_ensembles(records: Sequence[MoleculeRecord], path: str | Path) -> Path:
    """One SDF record per conformer with SD properties ``smiles``, ``conformer`` (and ``energy_eV``)."""
    from .io import write_sdf
    from .validity import with_coordinates

    mols, props = [], []
    for r in records:
        for k, c in enumerate(r.conformers.double().numpy()):
            mols.append(with_coordinates(r.mol, c))
            p = {"smiles": r.smiles, "conformer": k}
            if r.energies is not None:
                p["energy_eV"] = f"{float(r.energies[k]):.8f}"
            props.append(p)
    return write_sdf(mols, path, props)


def ensemble_datamodule(
    train: str,
    val: str | None = None,
    max_confs: int | None = 8,
    max_train_molecules: int | None = None,
    max_val_molecules: int | None = None,
    val_max_confs: int | None = None,
):
    """A ``unirep.train.DataModule`` of reference ensembles read from files (:func:`read_ensembles`).

    ``train`` and ``val`` are SDF / extxyz (grouped by SMILES) or GEOM msgpack files, e.g. the QM9 benchmark's
    ``train.sdf`` and ``test.sdf`` (``scripts/make_conformer_benchmark.py``). Molecules in both are an error.
    """
    from unirep.train import DataModule

    from .data import NUM_ATOM_FEATURES, NUM_BOND_TYPES, ConformerDataset, collate_molecules
    from .generate import SUPPORTED_ELEMENTS

    tr = read_ensembles(train, max_molecules=max_train_molecules, max_confs=max_confs)
    va = read_ensembles(val, max_molecules=max_val_molecules, max_confs=val_max_confs) if val else None
    if va:
        overlap = {r.smiles for r in tr} & {r.smiles for r in va}
        if overlap:
            raise ValueError(f"{len(overlap)} molecules are in both {train} and {val} (e.g. {sorted(overlap)[:3]})")
    info = {
        "elements": list(SUPPORTED_ELEMENTS),
        "num_atom_features": NUM_ATOM_FEATURES,
        "num_bond_types": NUM_BOND_TYPES,
    }
    return DataModule(
        ConformerDataset(tr), ConformerDataset(va) if va else None, collate_fn=collate_molecules, info=info
    )
