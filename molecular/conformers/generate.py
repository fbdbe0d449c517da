"""Reference conformer ensembles made offline: RDKit ETKDG, optional GFN2-xTB relaxation, RMSD de-duplication.

This is the recipe GEOM-like test sets are approximated with when CREST is not available: ETKDGv3 embeddings
(Riniker & Landrum 2015; Wang et al. 2020) pre-optimised with MMFF94, optionally relaxed with GFN2-xTB
(Bannwarth et al. 2019) through tblite's ASE calculator, then pruned so that no two kept conformers are
within ``prune_rmsd`` heavy-atom RMSD (``GetBestRMS``, the metric of :mod:`molecular.conformers.metrics`).
ETKDG itself is also the baseline every conformer generator is compared with (torsional diffusion, ET-Flow).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem

from .metrics import best_rmsd

__all__ = [
    "SUPPORTED_ELEMENTS",
    "mol_from_smiles",
    "check_elements",
    "etkdg_conformers",
    "xtb_relax",
    "xtb_energy",
    "prune_conformers",
    "reference_ensemble",
    "conformer_mols",
]

# Organic / drug-like chemistry. GFN2-xTB covers far more, but the velocity networks embed these only.
SUPPORTED_ELEMENTS: tuple[str, ...] = ("H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Br", "I")


def check_elements(mol: Chem.Mol, supported: Sequence[str] = SUPPORTED_ELEMENTS, name: str = "") -> None:
    """Raise ``ValueError`` naming the molecule and element when an atom is outside ``supported``."""
    bad = sorted({a.GetSymbol() for a in mol.GetAtoms()} - set(supported))
    if bad:
        raise ValueError(
            f"molecule {name or Chem.MolToSmiles(mol)!r} contains unsupported element(s) {bad}; supported are "
            f"{list(supported)}: remove the molecule from the data set or extend the model's element list"
        )


def mol_from_smiles(smiles: str, add_hs: bool = True, supported: Sequence[str] = SUPPORTED_ELEMENTS) -> Chem.Mol:
    """Parse and sanitise a SMILES string (explicit hydrogens by default); clear errors on bad input."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise ValueError(f"empty SMILES {smiles!r}: give a non-empty SMILES string")
    RDLogger.DisableLog("rdApp.*")  # rdkit prints parse errors to stderr; we raise a clearer one instead
    try:
        mol = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol is None:
        raise ValueError(
            f"invalid SMILES {smiles!r}: rdkit could not parse or sanitise it (check brackets, ring closures and "
            "valences)"
        )
    check_elements(mol, supported, smiles)
    return Chem.AddHs(mol) if add_hs else mol


def etkdg_conformers(mol: Chem.Mol, num: int, seed: int = 0, mmff: bool = True, max_attempts: int = 0) -> Chem.Mol:
    """Embed ``num`` ETKDGv3 conformers (MMFF94-optimised when ``mmff``) into a copy of ``mol``."""
    mol = Chem.Mol(mol)
    params = AllChem.ETKDGv3()
    # randomSeed = 0 makes rdkit embed every conformer from the same random state (all copies identical), so
    # seeds are shifted by one; -1 (rdkit's "random") is never produced
    params.randomSeed = int(seed) + 1
    params.numThreads = 1
    if max_attempts:
        params.maxIterations = max_attempts
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(num), params=params))
    if not ids:
        # Fall back to random-coordinate embedding, which succeeds for strained/macrocyclic cases ETKDG misses.
        params.useRandomCoords = True
        ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(num), params=params))
    if not ids:
        raise RuntimeError(f"ETKDG could not embed {Chem.MolToSmiles(Chem.RemoveHs(mol))!r}: check the structure")
    if mmff and AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=500)
    return mol


def _to_atoms(mol: Chem.Mol, conf_id: int):
    from ase import Atoms

    pos = mol.GetConformer(conf_id).GetPositions()
    return Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=pos)


def _tblite(mol: Chem.Mol):
    from tblite.ase import TBLite

    charge = Chem.GetFormalCharge(mol)
    unpaired = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    return TBLite(method="GFN2-xTB", charge=charge, multiplicity=unpaired + 1, verbosity=0)


def xtb_energy(mol: Chem.Mol, conf_id: int = -1) -> float:
    """GFN2-xTB single-point energy (eV) of one conformer."""
    atoms = _to_atoms(mol, conf_id)
    atoms.calc = _tblite(mol)
    return float(atoms.get_potential_energy())


def xtb_relax(mol: Chem.Mol, fmax: float = 0.05, steps: int = 200) -> tuple[Chem.Mol, np.ndarray]:
    """Relax every conformer of a copy of ``mol`` with GFN2-xTB (BFGS); returns the mol and energies in eV."""
    from ase.optimize import BFGS

    mol = Chem.Mol(mol)
    energies = []
    for conf in mol.GetConformers():
        atoms = _to_atoms(mol, conf.GetId())
        atoms.calc = _tblite(mol)
        BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
        for i, p in enumerate(atoms.get_positions()):
            conf.SetAtomPosition(i, p.tolist())
        energies.append(float(atoms.get_potential_energy()))
    return mol, np.asarray(energies)


def conformer_mols(mol: Chem.Mol) -> list[Chem.Mol]:
    """Split a multi-conformer Mol into single-conformer Mols (the unit the metrics compare)."""
    out = []
    for conf in mol.GetConformers():
        m = Chem.Mol(mol)
        m.RemoveAllConformers()
        m.AddConformer(Chem.Conformer(conf), assignId=True)
        out.append(m)
    return out


def prune_conformers(mols: Sequence[Chem.Mol], threshold: float, energies: Sequence[float] | None = None) -> list[int]:
    """Indices of conformers kept by greedy de-duplication: lowest energy first (input order without energies),
    a conformer is dropped when its heavy-atom ``GetBestRMS`` to a kept one is below ``threshold``."""
    order = np.argsort(energies, kind="stable") if energies is not None else np.arange(len(mols))
    kept: list[int] = []
    for i in order:
        if all(best_rmsd(mols[k], mols[i]) >= threshold for k in kept):
            kept.append(int(i))
    return kept


def reference_ensemble(
    smiles: str,
    num_confs: int = 10,
    seed: int = 0,
    relax: bool = False,
    prune_rmsd: float = 0.25,
    max_confs: int | None = None,
) -> tuple[list[Chem.Mol], np.ndarray | None]:
    """Reference ensemble of one molecule: ``(single-conformer Mols, GFN2-xTB energies in eV or None)``.

    ETKDG ``num_confs`` embeddings -> MMFF94 -> (GFN2-xTB relaxation when ``relax``) -> RMSD pruning at
    ``prune_rmsd`` Å, lowest energy kept first; at most ``max_confs`` are returned.
    """
    mol = etkdg_conformers(mol_from_smiles(smiles), num_confs, seed=seed)
    energies = None
    if relax:
        mol, energies = xtb_relax(mol)
    mols = conformer_mols(mol)
    kept = prune_conformers(mols, prune_rmsd, energies)
    if max_confs is not None:
        kept = kept[:max_confs]
    return [mols[i] for i in kept], (None if energies is None else energies[kept])
