"""Validity of generated conformers: does the structure keep its bond graph and sanitise back to the molecule?

Bonds are perceived from the coordinates alone with rdkit's ``rdDetermineBonds`` (covalent-radius connectivity,
then the xyz2mol bond-order assignment of Kim & Kim 2015), the check GeoLDM/EDM-style molecule generators and
torsional diffusion's ``clean_confs`` (canonical SMILES of the generated conformer equal to the input's) use.
Unlike those, the SMILES comparison is stereo-aware by default (isomeric SMILES with stereo perceived from the 3-D
coordinates) and ``valid_stereo`` reports the CIP labels kept (:mod:`.stereo`): a mirrored centre is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds

from .stereo import keeps_stereo

__all__ = ["with_coordinates", "keeps_bond_graph", "sanitises_to_same", "validity_stats"]


def with_coordinates(template: Chem.Mol, pos: np.ndarray) -> Chem.Mol:
    """A copy of ``template`` (explicit hydrogens, same atom order) with one conformer at ``pos[N, 3]`` Å."""
    pos = np.asarray(pos, dtype=float)
    n = template.GetNumAtoms()
    if pos.shape != (n, 3):
        raise ValueError(f"coordinates of shape {pos.shape} do not fit molecule with {n} atoms: need [{n}, 3]")
    if not np.isfinite(pos).all():
        raise ValueError("coordinates contain NaN or inf: the sampler diverged (use more steps or check the model)")
    mol = Chem.Mol(template)
    mol.RemoveAllConformers()
    conf = Chem.Conformer(n)
    for i, p in enumerate(pos):
        conf.SetAtomPosition(i, p.tolist())
    mol.AddConformer(conf, assignId=True)
    return mol


def _bare(mol: Chem.Mol) -> Chem.Mol:
    """Atoms and coordinates only (no bonds), the input of bond perception."""
    rw = Chem.RWMol(mol)
    for b in list(mol.GetBonds()):
        rw.RemoveBond(b.GetBeginAtomIdx(), b.GetEndAtomIdx())
    for a in rw.GetAtoms():
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
    return rw.GetMol()


def keeps_bond_graph(mol: Chem.Mol) -> bool:
    """True when covalent-radius connectivity of the coordinates equals the molecule's bond graph."""
    bare = _bare(mol)
    rdDetermineBonds.DetermineConnectivity(bare)
    a = Chem.GetAdjacencyMatrix(bare)
    b = Chem.GetAdjacencyMatrix(mol)
    return bool(a.shape == b.shape and (a == b).all())


def _drop_unspecified(perceived: Chem.Mol, template: Chem.Mol) -> None:
    """Clear the stereo the coordinates give to elements the template leaves unspecified (same atom order)."""
    for a, t in zip(perceived.GetAtoms(), template.GetAtoms(), strict=True):
        if t.GetChiralTag() == Chem.ChiralType.CHI_UNSPECIFIED:
            a.SetChiralTag(Chem.ChiralType.CHI_UNSPECIFIED)
    drop, keep_atoms = [], set()
    for b in perceived.GetBonds():
        if b.GetStereo() == Chem.BondStereo.STEREONONE:
            continue
        tb = template.GetBondBetweenAtoms(b.GetBeginAtomIdx(), b.GetEndAtomIdx())
        if tb is None or tb.GetStereo() == Chem.BondStereo.STEREONONE:
            drop.append(b)
        else:
            keep_atoms.update((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
    for b in drop:
        b.SetStereo(Chem.BondStereo.STEREONONE)
        for atom in (b.GetBeginAtom(), b.GetEndAtom()):  # the directions that would write / and \\ for it
            for nb in atom.GetBonds():
                ends = {nb.GetBeginAtomIdx(), nb.GetEndAtomIdx()}
                if nb.GetBondType() == Chem.BondType.SINGLE and not ends & keep_atoms:
                    nb.SetBondDir(Chem.BondDir.NONE)


def sanitises_to_same(mol: Chem.Mol, stereo: bool = True) -> bool:
    """True when bonds, orders (and stereo) perceived from coordinates give the molecule's canonical SMILES.

    With ``stereo`` (default) the comparison is of isomeric SMILES: chiral tags and double-bond stereo are perceived
    from the 3-D coordinates (``AssignStereochemistryFrom3D``), and elements the molecule leaves unspecified are not
    compared. ``stereo=False`` is the old, stereo-blind check (a mirrored centre passes it).
    """
    template = Chem.Mol(mol)
    template.RemoveAllConformers()
    Chem.AssignStereochemistry(template, cleanIt=True, force=True)
    ref = Chem.MolToSmiles(Chem.RemoveHs(template), isomericSmiles=stereo)
    bare = _bare(mol)
    RDLogger.DisableLog("rdApp.*")
    try:
        rdDetermineBonds.DetermineBonds(bare, charge=Chem.GetFormalCharge(mol))
        Chem.SanitizeMol(bare)
        if stereo:
            Chem.AssignStereochemistryFrom3D(bare, replaceExistingTags=True)
            _drop_unspecified(bare, mol)
        got = Chem.MolToSmiles(Chem.RemoveHs(bare), isomericSmiles=stereo)
    except Exception:  # bond-order assignment fails on distorted geometries: that is an invalid structure
        return False
    finally:
        RDLogger.EnableLog("rdApp.*")
    return got == ref


def validity_stats(mols: Sequence[Chem.Mol]) -> dict[str, float]:
    """Shares of structures that keep their bond graph, keep the specified stereo (CIP labels from the coordinates)
    and sanitise back to the same isomeric SMILES."""
    if not mols:
        return {"valid_graph": float("nan"), "valid_stereo": float("nan"), "valid_smiles": float("nan")}
    graph = [keeps_bond_graph(m) for m in mols]
    stereo = [keeps_stereo(m) for m in mols]
    smiles = [g and sanitises_to_same(m) for g, m in zip(graph, mols, strict=True)]
    return {
        "valid_graph": float(np.mean(graph)),
        "valid_stereo": float(np.mean(stereo)),
        "valid_smiles": float(np.mean(smiles)),
    }
