"""The conformer benchmark: ensembles users bring (SDF, extxyz, GEOM msgpack; never pickles), COV/MAT of the
evaluation against torsional diffusion's definitions on a hand-made case, and one GFN2 reference ensemble."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.conformers import (
    conformer_mols,
    etkdg_conformers,
    make_record,
    mol_from_smiles,
    read_ensembles,
    with_coordinates,
    write_ensembles,
)
from molecular.flows import evaluate_conformers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def record():
    return make_record("C[C@H](O)CCO", num_confs=6, max_confs=4, prune_rmsd=0.3, seed=3)


def _heavy_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Kabsch RMSD (rotations only) after centring: GetBestRMS when no symmetric mapping is better."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    return float(np.sqrt(((a @ (u @ np.diag([1, 1, d]) @ vt) - b) ** 2).sum(1).mean()))


def test_cov_mat_reproduce_torsional_diffusion_definitions(record):
    """COV-R: share of references with a generated conformer strictly closer than delta; MAT-R: mean over references
    of the closest; -P swaps roles; heavy atoms only (RemoveHs), optimal alignment; per molecule."""
    refs = record.conformers.double().numpy()  # [K, N, 3]
    heavy = np.array([a.GetAtomicNum() > 1 for a in record.mol.GetAtoms()])
    rng = np.random.default_rng(0)
    gens = []
    for k, scale in enumerate([0.05, 0.6, 0.1]):  # generated j = reference j perturbed on heavy atoms
        g = refs[k % len(refs)].copy()
        g[heavy] += rng.normal(0, scale, size=(heavy.sum(), 3))
        g[~heavy] += rng.normal(0, 1.0, size=((~heavy).sum(), 3))  # hydrogens never count
        gens.append(g)
    gens = np.stack(gens)
    rmsd = np.array([[_heavy_rmsd(g[heavy], r[heavy]) for g in gens] for r in refs])  # [K_ref, K_gen]
    agg, rows = evaluate_conformers([record], [gens], delta=0.5)
    assert rows[0]["cov_r"] == pytest.approx(np.mean(rmsd.min(1) < 0.5), abs=1e-9)
    assert rows[0]["mat_r"] == pytest.approx(rmsd.min(1).mean(), abs=1e-3)
    assert rows[0]["cov_p"] == pytest.approx(np.mean(rmsd.min(0) < 0.5), abs=1e-9)
    assert rows[0]["mat_p"] == pytest.approx(rmsd.min(0).mean(), abs=1e-3)
    assert agg["cov_r_mean"] == rows[0]["cov_r"] and agg["num_molecules"] == 1.0
    assert "valid_stereo" in agg


def test_sdf_and_extxyz_round_trip_grouped_by_smiles(tmp_path, record):
    other = make_record("CCOC", num_confs=3, max_confs=2, seed=0)
    record.energies = torch.arange(record.conformers.shape[0], dtype=torch.float64)
    path = write_ensembles([record, other], tmp_path / "refs.sdf")
    back = read_ensembles(path)
    assert [r.smiles for r in back] == [record.smiles, other.smiles]
    torch.testing.assert_close(back[0].conformers, record.conformers, atol=1e-4, rtol=0)
    torch.testing.assert_close(back[0].energies, record.energies)
    # extxyz with shuffled atoms: mapped back onto the SMILES's atom order by the bond graph
    from ase import Atoms
    from ase.io import write

    perm = np.random.default_rng(1).permutation(other.num_atoms)
    frames = []
    for c in other.conformers.double().numpy():
        a = Atoms(numbers=[x.GetAtomicNum() for x in other.mol.GetAtoms()], positions=c)[perm]
        a.info["smiles"] = "COCC"  # any SMILES of the molecule
        frames.append(a)
    write(tmp_path / "refs.extxyz", frames, format="extxyz")
    (rec,) = read_ensembles(tmp_path / "refs.extxyz")
    assert rec.conformers.shape == other.conformers.shape
    from molecular.conformers import best_rmsd

    m0 = with_coordinates(rec.mol, rec.conformers[0].double().numpy())
    assert best_rmsd(m0, with_coordinates(other.mol, other.conformers[0].double().numpy())) < 1e-4


def test_geom_msgpack_is_read_and_pickles_are_refused(tmp_path):
    msgpack = pytest.importorskip("msgpack")
    mol = conformer_mols(etkdg_conformers(mol_from_smiles("CCO"), 2, seed=0))
    entry = {
        "CCO": {
            "conformers": [
                {
                    "xyz": [
                        [a.GetAtomicNum(), *p]
                        for a, p in zip(m.GetAtoms(), m.GetConformer().GetPositions(), strict=True)
                    ],
                    "totalenergy": -10.0 - i,
                }
                for i, m in enumerate(mol)
            ]
        }
    }
    path = tmp_path / "qm9_crude.msgpack"
    path.write_bytes(msgpack.packb(entry))
    (rec,) = read_ensembles(path)
    assert rec.conformers.shape[0] == 2 and rec.energies[0] == pytest.approx(-10.0 * 27.211386245988)
    bad = tmp_path / "rd_mols.pickle"
    bad.write_bytes(b"not opened")
    with pytest.raises(ValueError, match="never loaded"):
        read_ensembles(bad)


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_conformer_benchmark", ROOT / "scripts/make_conformer_benchmark.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_conformer_benchmark"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gfn2_reference_ensemble_is_made_of_distinct_minima():
    pytest.importorskip("tblite")
    mod = _script()
    template = mol_from_smiles("CCO")
    start = conformer_mols(etkdg_conformers(template, 1, seed=5))[0].GetConformer().GetPositions()
    args = mod.main.__globals__["argparse"].Namespace(
        etkdg_starts=2,
        md_snapshots=0,
        md_temperature=1000.0,
        md_interval=5,
        fmax=0.05,
        opt_steps=100,
        energy_window=6.0,
        dedup_rmsd=0.125,
    )
    res = mod.reference_ensemble({"smiles": "CCO", "template": template, "qm9_pos": start, "index": 0}, args, seed=0)
    assert 1 <= len(res["conformers"]) <= res["num_starts"] == 3
    e = np.array([c["energy_eV"] for c in res["conformers"]])
    assert (e - e.min() <= 6.0 * 0.0433641 + 1e-9).all()
