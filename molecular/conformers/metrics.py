"""Conformer ensemble metrics: COV/MAT recall and precision, exactly as torsional diffusion and ET-Flow.

Definitions follow ``gcorso/torsional-diffusion`` ``evaluate_confs.py`` (itself from GeoMol) and ET-Flow's
``covmat.py`` (Jing et al. 2022, "Torsional Diffusion for Molecular Conformer Generation"; Hassan et al. 2024,
"ET-Flow: Equivariant Flow-Matching for Molecular Conformer Generation"):

- RMSD between a reference conformer and a generated one is rdkit ``GetBestRMS`` (optimal alignment over the
  symmetry-equivalent atom mappings) of the heavy-atom molecules, ``Chem.RemoveHs`` applied to both;
- ``rmsd[i, j]`` for reference ``i`` and generated ``j``;
- COV-R(δ) = share of references whose closest generated conformer is *strictly* below δ; MAT-R (AMR-R) = mean
  over references of that minimum; COV-P / MAT-P swap the roles (per generated conformer);
- per molecule first, then mean (and median) over molecules; a molecule whose model produced nothing counts
  as coverage 0 (the anchor's ``num_failures``).

δ = 0.5 Å for QM9-size molecules and 0.75 Å for drug-like ones (GEOM-DRUGS); 2 generated per reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign

__all__ = [
    "DELTA_QM9",
    "DELTA_DRUGS",
    "best_rmsd",
    "rmsd_matrix",
    "coverage_stats",
    "aggregate_stats",
    "default_delta",
]

DELTA_QM9 = 0.5
DELTA_DRUGS = 0.75


def default_delta(num_heavy_atoms: int) -> float:
    """0.5 Å for QM9-size molecules (at most 9 heavy atoms), 0.75 Å for larger, drug-like ones."""
    return DELTA_QM9 if num_heavy_atoms <= 9 else DELTA_DRUGS


def best_rmsd(ref: Chem.Mol, gen: Chem.Mol, ref_id: int = -1, gen_id: int = -1, max_matches: int = 10000) -> float:
    """Heavy-atom RMSD after optimal alignment and symmetry matching (``GetBestRMS`` after ``RemoveHs``).

    The anchor calls ``GetBestRMS(RemoveHs(true), RemoveHs(model))``: the reference is the probe that is moved.
    RMSD is symmetric under that choice, so the order only matters for which copy rdkit moves (none here: we
    pass copies, nothing the caller holds is changed).
    """
    prb = Chem.RemoveHs(Chem.Mol(ref, confId=ref_id) if ref_id >= 0 else Chem.Mol(ref), sanitize=False)
    refm = Chem.RemoveHs(Chem.Mol(gen, confId=gen_id) if gen_id >= 0 else Chem.Mol(gen), sanitize=False)
    return float(rdMolAlign.GetBestRMS(prb, refm, maxMatches=max_matches))


def rmsd_matrix(refs: Sequence[Chem.Mol], gens: Sequence[Chem.Mol]) -> np.ndarray:
    """``rmsd[i, j]`` between reference ``refs[i]`` and generated ``gens[j]`` (one conformer per Mol each)."""
    out = np.full((len(refs), len(gens)), np.nan)
    for i, r in enumerate(refs):
        for j, g in enumerate(gens):
            out[i, j] = best_rmsd(r, g)
    return out


def coverage_stats(rmsd: np.ndarray, delta: float) -> dict[str, float]:
    """COV-R, MAT-R, COV-P, MAT-P of one molecule from its ``rmsd[n_ref, n_gen]`` matrix.

    Coverage uses a strict ``<`` as the anchor does, so identical sets give COV = 1 and MAT = 0 for any δ > 0.
    """
    rmsd = np.asarray(rmsd, dtype=float)
    if rmsd.ndim != 2 or rmsd.shape[0] == 0 or rmsd.shape[1] == 0:
        raise ValueError(f"coverage_stats needs a non-empty [n_ref, n_gen] matrix, got shape {rmsd.shape}")
    min_r = rmsd.min(axis=1)  # closest generated conformer for each reference [n_ref]
    min_p = rmsd.min(axis=0)  # closest reference for each generated conformer [n_gen]
    return {
        "cov_r": float(np.mean(min_r < delta)),
        "mat_r": float(min_r.mean()),
        "cov_p": float(np.mean(min_p < delta)),
        "mat_p": float(min_p.mean()),
    }


def aggregate_stats(per_molecule: Sequence[dict[str, float]], num_failures: int = 0) -> dict[str, float]:
    """Mean and median over molecules; failures add coverage 0 (and are excluded from MAT, as ``nanmean``)."""
    out: dict[str, float] = {}
    for key in ("cov_r", "cov_p"):
        vals = [s[key] for s in per_molecule] + [0.0] * num_failures
        out[f"{key}_mean"] = float(np.mean(vals)) if vals else float("nan")
        out[f"{key}_median"] = float(np.median(vals)) if vals else float("nan")
    for key in ("mat_r", "mat_p"):
        vals = np.array([s[key] for s in per_molecule], dtype=float)
        out[f"{key}_mean"] = float(np.nanmean(vals)) if vals.size else float("nan")
        out[f"{key}_median"] = float(np.nanmedian(vals)) if vals.size else float("nan")
    out["num_molecules"] = float(len(per_molecule) + num_failures)
    return out
