"""Stereochemistry perceived from 3-D coordinates, and ET-Flow's post-hoc chirality correction.

An E(3)-equivariant generator is exactly reflection-equivariant: given a graph it produces a conformer and its mirror
image with the same probability, so it cannot prefer one enantiomer. ET-Flow (Hassan et al. 2024,
``shenoynikhil/ETFlow``, ``parity_switch: post_hoc``) keeps the network equivariant and corrects the parity after
sampling: a conformer whose tetrahedral centres disagree with the molecule's specified chirality is reflected
through its centre (``x -> -x``), which inverts every tetrahedral centre and leaves bond lengths, angles, torsion
magnitudes and E/Z double bonds unchanged. With several centres a reflection can only fix a conformer whose centres
are all inverted; the rule here reflects when more than half of the specified centres disagree (a tie keeps it).

Labels are rdkit's new CIP labeller (``rdCIPLabeler``, Hanson et al. 2018) on the molecule's own bond graph with the
chiral tags and double-bond stereo perceived from the conformer (``AssignStereochemistryFrom3D``). Centres the
molecule leaves unspecified (a SMILES without ``@``) are not judged: any configuration is correct for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdCIPLabeler

__all__ = ["cip_labels", "specified_stereo", "perceived_stereo", "keeps_stereo", "correct_chirality"]


def cip_labels(mol: Chem.Mol) -> dict[str, str]:
    """CIP labels of a molecule's stereo elements as it stands: ``{"a<idx>": "R"/"S", "b<i>-<j>": "E"/"Z"}``."""
    m = Chem.Mol(mol)
    Chem.AssignStereochemistry(m, cleanIt=True, force=True)
    try:
        rdCIPLabeler.AssignCIPLabels(m)
    except Exception:  # the labeller gives up on pathological graphs (very rare in QM9): no judged centres
        return {}
    out = {}
    for a in m.GetAtoms():
        if a.HasProp("_CIPCode"):
            out[f"a{a.GetIdx()}"] = a.GetProp("_CIPCode").upper()
    for b in m.GetBonds():
        if b.HasProp("_CIPCode"):
            i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
            out[f"b{i}-{j}"] = b.GetProp("_CIPCode").upper()
    return out


def specified_stereo(template: Chem.Mol) -> dict[str, str]:
    """The stereo the molecule specifies (from its SMILES/SDF flags, not from any conformer)."""
    m = Chem.Mol(template)
    m.RemoveAllConformers()
    return cip_labels(m)


def perceived_stereo(mol: Chem.Mol, conf_id: int = -1) -> dict[str, str]:
    """CIP labels of the stereo elements as the coordinates of conformer ``conf_id`` have them."""
    m = Chem.Mol(mol, confId=conf_id) if conf_id >= 0 else Chem.Mol(mol)
    for a in m.GetAtoms():
        a.SetChiralTag(Chem.ChiralType.CHI_UNSPECIFIED)
    for b in m.GetBonds():
        b.SetStereo(Chem.BondStereo.STEREONONE)
    Chem.AssignStereochemistryFrom3D(m, confId=-1, replaceExistingTags=True)
    return cip_labels(m)


def _mismatches(expected: dict[str, str], got: dict[str, str], atoms_only: bool = False) -> tuple[int, int]:
    keys = [k for k in expected if not atoms_only or k.startswith("a")]
    return sum(got.get(k) != expected[k] for k in keys), len(keys)


def keeps_stereo(mol: Chem.Mol, template: Chem.Mol | None = None) -> bool:
    """True when every stereo element the molecule specifies has the same CIP label in the coordinates.

    ``mol`` carries the conformer; ``template`` (default: ``mol`` itself, whose flags :func:`with_coordinates`
    copies from the template) says what is specified.
    """
    expected = specified_stereo(template if template is not None else mol)
    if not expected:
        return True
    wrong, _ = _mismatches(expected, perceived_stereo(mol))
    return wrong == 0


def correct_chirality(template: Chem.Mol, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reflect the samples whose tetrahedral centres mostly disagree with the template (ET-Flow's post hoc switch).

    ``positions[k, N, 3]`` (Å, any centre); returns ``(corrected[k, N, 3], flipped[k] bool)``. A reflection through
    each sample's centroid inverts all of its centres; it is applied when more than half of the specified
    tetrahedral centres have the wrong label. Molecules without specified centres are returned unchanged.
    """
    from .validity import with_coordinates

    positions = np.asarray(positions, dtype=float)
    expected = {k: v for k, v in specified_stereo(template).items() if k.startswith("a")}
    flipped = np.zeros(positions.shape[0], dtype=bool)
    if not expected:
        return positions.copy(), flipped
    out = positions.copy()
    for s, pos in enumerate(positions):
        if not np.isfinite(pos).all():
            continue
        wrong, total = _mismatches(expected, perceived_stereo(with_coordinates(template, pos)), atoms_only=True)
        if 2 * wrong > total:
            centre = pos.mean(axis=0, keepdims=True)
            out[s] = 2 * centre - pos  # point reflection through the centroid: all centres inverted
            flipped[s] = True
    return out, flipped


def stereo_share(mols: Sequence[Chem.Mol]) -> float:
    """Share of structures that keep their molecule's specified stereo."""
    return float(np.mean([keeps_stereo(m) for m in mols])) if mols else float("nan")
