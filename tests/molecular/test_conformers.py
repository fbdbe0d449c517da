"""COV/MAT on hand-made cases, reference ensembles, validity checks, writers and input errors."""

import numpy as np
import pytest
from rdkit import Chem
from scipy.spatial.transform import Rotation

from molecular.conformers import (
    ConformerDataset,
    aggregate_stats,
    best_rmsd,
    collate_molecules,
    conformer_mols,
    coverage_stats,
    etkdg_conformers,
    featurize,
    keeps_bond_graph,
    mol_from_smiles,
    prune_conformers,
    reference_ensemble,
    rmsd_matrix,
    sanitises_to_same,
    validity_stats,
    with_coordinates,
    write_extxyz,
    write_sdf,
    xtb_energy,
)


@pytest.fixture(scope="module")
def butanol_confs():
    return conformer_mols(etkdg_conformers(mol_from_smiles("CCCCO"), 6, seed=1))


def _heavy_kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Independent definition: optimal rotation (Kabsch, reflections excluded) after centring."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1, 1, d]) @ vt
    return float(np.sqrt(((a @ r - b) ** 2).sum(1).mean()))


def test_identical_sets_give_full_coverage_and_zero_mat(butanol_confs):
    rmsd = rmsd_matrix(butanol_confs, butanol_confs)
    assert np.allclose(np.diag(rmsd), 0.0, atol=1e-6)
    s = coverage_stats(rmsd, 0.5)
    assert s["cov_r"] == 1.0 and s["cov_p"] == 1.0
    assert s["mat_r"] < 1e-6 and s["mat_p"] < 1e-6


def test_rigid_motion_and_hydrogens_do_not_count(butanol_confs):
    ref = butanol_confs[0]
    pos = ref.GetConformer().GetPositions()
    moved = pos @ Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix().T + np.array([3.0, -2.0, 7.0])
    heavy = np.array([a.GetAtomicNum() > 1 for a in ref.GetAtoms()])
    moved[~heavy] += 0.8  # hydrogens are removed before the RMSD: moving them changes nothing
    assert best_rmsd(ref, with_coordinates(ref, moved)) < 1e-5


def test_perturbed_copy_gives_known_rmsd(butanol_confs):
    ref = butanol_confs[0]
    pos = ref.GetConformer().GetPositions()
    heavy = np.array([a.GetAtomicNum() > 1 for a in ref.GetAtoms()])
    rng = np.random.default_rng(0)
    gen = pos.copy()
    gen[heavy] += rng.normal(0, 0.3, size=(heavy.sum(), 3))
    expected = _heavy_kabsch_rmsd(gen[heavy], pos[heavy])
    got = best_rmsd(ref, with_coordinates(ref, gen))
    # GetBestRMS also tries symmetry-equivalent mappings (terminal O/C are not equivalent in butanol)
    assert got == pytest.approx(expected, abs=1e-4)
    assert 0.1 < got < 0.6


def test_coverage_stats_hand_matrix():
    rmsd = np.array([[0.2, 0.9, 1.5], [0.6, 0.8, 0.4]])  # 2 references x 3 generated
    s = coverage_stats(rmsd, 0.5)
    assert s["cov_r"] == pytest.approx(1.0)  # mins 0.2, 0.4
    assert s["mat_r"] == pytest.approx(0.3)
    assert s["cov_p"] == pytest.approx(2 / 3)  # mins 0.2, 0.8, 0.4
    assert s["mat_p"] == pytest.approx((0.2 + 0.8 + 0.4) / 3)
    assert coverage_stats(np.array([[0.5]]), 0.5)["cov_r"] == 0.0  # strict '<' as the anchor
    agg = aggregate_stats([s, coverage_stats(np.array([[1.0]]), 0.5)], num_failures=1)
    assert agg["cov_r_mean"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert agg["mat_r_mean"] == pytest.approx((0.3 + 1.0) / 2)
    with pytest.raises(ValueError, match="non-empty"):
        coverage_stats(np.zeros((0, 3)), 0.5)


def test_prune_and_reference_ensemble(butanol_confs):
    kept = prune_conformers(butanol_confs + [butanol_confs[0]], threshold=0.05)
    assert len(kept) <= len(butanol_confs) and 0 in kept and len(butanol_confs) not in kept
    confs, energies = reference_ensemble("CCO", num_confs=4, prune_rmsd=0.1, relax=False)
    assert energies is None and 1 <= len(confs) <= 4
    r = rmsd_matrix(confs, confs)
    assert (r[~np.eye(len(confs), dtype=bool)] >= 0.1).all()


def test_xtb_energy_is_finite_and_relaxation_lowers_it():
    from molecular.conformers import xtb_relax

    mol = etkdg_conformers(mol_from_smiles("CO"), 1, seed=0, mmff=False)
    e0 = xtb_energy(mol)
    relaxed, e = xtb_relax(mol, fmax=0.1, steps=30)
    assert np.isfinite(e0) and e[0] <= e0 + 1e-6


def test_validity_checks(butanol_confs):
    ref = butanol_confs[0]
    assert keeps_bond_graph(ref) and sanitises_to_same(ref)
    pos = ref.GetConformer().GetPositions().copy()
    pos[0] = pos[4] + 0.3  # push the first carbon into the oxygen: bond graph broken
    bad = with_coordinates(ref, pos)
    assert not keeps_bond_graph(bad)
    stats = validity_stats([ref, bad])
    assert stats["valid_graph"] == 0.5 and stats["valid_smiles"] == 0.5
    with pytest.raises(ValueError, match="NaN"):
        with_coordinates(ref, np.full_like(pos, np.nan))
    with pytest.raises(ValueError, match="do not fit"):
        with_coordinates(ref, pos[:3])


def test_writers_round_trip(tmp_path, butanol_confs):
    from ase.io import read

    p = write_sdf(butanol_confs[:2], tmp_path / "out.sdf", props=[{"energy": 1.0}, {"energy": 2.0}])
    back = [m for m in Chem.SDMolSupplier(str(p), removeHs=False)]
    assert len(back) == 2 and back[1].GetProp("energy") == "2.0"
    assert np.allclose(back[0].GetConformer().GetPositions(), butanol_confs[0].GetConformer().GetPositions(), atol=1e-4)
    frames = read(
        str(write_extxyz(butanol_confs[:3], tmp_path / "out.xyz", props=[{"k": i} for i in range(3)])), index=":"
    )
    assert len(frames) == 3 and frames[0].info["smiles"] == "CCCCO" and frames[2].info["k"] == 2
    assert np.allclose(frames[1].positions, butanol_confs[1].GetConformer().GetPositions())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="invalid SMILES 'C1CC'"):
        mol_from_smiles("C1CC")
    with pytest.raises(ValueError, match="unsupported element.*Fe"):
        mol_from_smiles("[Fe]CC")
    with pytest.raises(ValueError, match="empty SMILES"):
        mol_from_smiles("  ")
    with pytest.raises(ValueError, match="no molecules"):
        ConformerDataset([])


def test_featurize_and_collate():
    ds = ConformerDataset.from_smiles(["CCO", "c1ccccc1"], num_confs=2, max_confs=2)
    types, feats, bidx, btyp = featurize(ds.records[1].mol)
    assert types.shape == (12,) and bidx.shape == (2, 24) and (btyp[:12] > 0).all()
    assert (btyp == 4).sum() == 12  # aromatic ring bonds, both directions
    b = collate_molecules([ds[0], ds[len(ds) - 1]])
    assert b.num_graphs == 2 and b.positions.shape == (9 + 12, 3)
    assert int(b.bond_index.min()) == 0 and int(b.bond_index[:, 16:].min()) >= 9  # offsets applied


def test_etkdg_conformers_differ_for_seed_zero():
    from rdkit.Chem import AllChem

    m = etkdg_conformers(mol_from_smiles("CCCCO"), 4, seed=0, mmff=False)
    assert min(AllChem.GetConformerRMS(m, 0, i) for i in range(1, 4)) > 0.1


# -- stereo ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def butan2ol():
    """(S)-butan-2-ol: one stereocentre; four ETKDG conformers."""
    return conformer_mols(etkdg_conformers(mol_from_smiles("C[C@H](O)CC"), 4, seed=2))


def test_stereo_aware_validity_catches_a_flipped_centre_the_old_check_passed(butan2ol):
    from molecular.conformers import keeps_stereo

    ref = butan2ol[0]
    mirror = with_coordinates(ref, -ref.GetConformer().GetPositions())
    assert sanitises_to_same(ref) and keeps_stereo(ref)
    assert sanitises_to_same(mirror, stereo=False)  # the old, stereo-blind check passes the enantiomer
    assert not sanitises_to_same(mirror) and not keeps_stereo(mirror)
    stats = validity_stats([ref, mirror])
    assert stats["valid_graph"] == 1.0 and stats["valid_stereo"] == 0.5 and stats["valid_smiles"] == 0.5
    # unspecified centres are not judged: either configuration of racemic butan-2-ol is valid
    rac = with_coordinates(mol_from_smiles("CC(O)CC"), ref.GetConformer().GetPositions())
    rac_mirror = with_coordinates(rac, -ref.GetConformer().GetPositions())
    assert sanitises_to_same(rac) and sanitises_to_same(rac_mirror) and keeps_stereo(rac_mirror)
    # E/Z double bonds are perceived from the coordinates too
    trans = conformer_mols(etkdg_conformers(mol_from_smiles("C/C=C/C"), 1, seed=0))[0]
    cis = mol_from_smiles("C/C=C\\C")
    assert sanitises_to_same(trans)
    assert not sanitises_to_same(with_coordinates(cis, trans.GetConformer().GetPositions()))


def test_chirality_correction_flips_exactly_the_mirrored_samples(butan2ol):
    from molecular.conformers import correct_chirality, keeps_stereo

    template = butan2ol[0]
    pos = np.stack([m.GetConformer().GetPositions() for m in butan2ol])  # [4, N, 3]
    mirrored = np.array([False, True, True, False])
    samples = np.where(mirrored[:, None, None], -pos, pos)
    fixed, flipped = correct_chirality(template, samples)
    assert (flipped == mirrored).all()
    assert all(keeps_stereo(with_coordinates(template, p)) for p in fixed)
    np.testing.assert_allclose(fixed[~mirrored], samples[~mirrored])  # untouched samples are unchanged
    for k in np.flatnonzero(mirrored):  # a reflection: the conformer's shape is kept (RMSD 0 to the original)
        assert best_rmsd(butan2ol[k], with_coordinates(template, fixed[k])) < 1e-6
    # without a specified centre nothing is flipped
    _, none = correct_chirality(mol_from_smiles("CC(O)CC"), samples)
    assert not none.any()
