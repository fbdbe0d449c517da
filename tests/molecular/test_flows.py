"""Equivariant velocity network, priors, conformer flow task: symmetries in float64, zero CoM, training, sampling."""

import numpy as np
import pytest
import torch
from scipy.stats import special_ortho_group

from molecular.conformers import ConformerDataset, collate_molecules
from molecular.flows import GaussianPrior, HarmonicPrior, bond_laplacian, egnn_tiny, remove_mean
from molecular.conformers.data import NUM_ATOM_FEATURES


@pytest.fixture(scope="module")
def data():
    return ConformerDataset.from_smiles(["CCO", "CC(=O)N", "c1ccoc1"], num_confs=3, max_confs=2)


@pytest.fixture(scope="module")
def batch(data):
    return collate_molecules([data[i] for i in range(len(data))])


def _perm_batch(batch, perm):
    """Relabel atoms by ``perm`` (new atom k is old atom perm[k]) consistently in every per-atom field."""
    from dataclasses import replace

    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return replace(
        batch,
        atom_types=batch.atom_types[perm],
        atom_features=batch.atom_features[perm],
        pos=batch.pos[perm],
        batch=batch.batch[perm],
        bond_index=inv[batch.bond_index],
    )


@pytest.mark.parametrize("latent_dim", [0, 4])
def test_velocity_net_is_e3_equivariant_float64(batch, latent_dim):
    torch.manual_seed(0)
    net = egnn_tiny(NUM_ATOM_FEATURES, latent_dim=latent_dim).double()
    # make coordinate updates large enough that a broken symmetry would show
    for layer in net.layers:
        torch.nn.init.normal_(layer.coord_mlp[-1].weight, std=0.5)
    x = torch.randn(batch.pos.shape, dtype=torch.float64)
    t = torch.rand(batch.num_graphs, dtype=torch.float64)[batch.batch]
    z = torch.randn(x.shape[0], latent_dim, dtype=torch.float64) if latent_dim else None
    out = net(batch, x, t, z)
    v, vz = out if latent_dim else (out, None)
    assert v.abs().max() > 1e-3  # a non-trivial velocity
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=1))
    R_improper = -R  # a reflection too: EGNN is E(3) equivariant
    shift = torch.tensor([1.5, -3.0, 0.7], dtype=torch.float64)
    for Q in (R, R_improper):
        out2 = net(batch, x @ Q.T + shift, t, z)
        v2, vz2 = out2 if latent_dim else (out2, None)
        torch.testing.assert_close(v2, v @ Q.T, atol=1e-10, rtol=1e-9)
        if latent_dim:
            torch.testing.assert_close(vz2, vz, atol=1e-10, rtol=1e-9)
    # zero centre of mass of the velocity per molecule
    assert remove_mean(v, batch.batch, batch.num_graphs).sub(v).abs().max() < 1e-12
    # permutation of atoms (across and within molecules) permutes the outputs
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    pb = _perm_batch(batch, perm)
    out3 = net(pb, x[perm], t[perm], None if z is None else z[perm])
    v3, vz3 = out3 if latent_dim else (out3, None)
    torch.testing.assert_close(v3, v[perm], atol=1e-10, rtol=1e-9)
    if latent_dim:
        torch.testing.assert_close(vz3, vz[perm], atol=1e-10, rtol=1e-9)


def test_intermediates_invariant_and_every_parameter_gets_gradient(batch):
    torch.manual_seed(1)
    net = egnn_tiny(NUM_ATOM_FEATURES, latent_dim=3).double()
    x = batch.pos.double()
    t = torch.full((x.shape[0],), 0.3, dtype=torch.float64)
    z = torch.randn(x.shape[0], 3, dtype=torch.float64)
    v, vz, feats = net.forward_intermediates(batch, x, t, z, indices=(1, 2))
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=2))
    _, _, feats_r = net.forward_intermediates(batch, x @ R.T, t, z, indices=(1, 2))
    torch.testing.assert_close(feats_r[2], feats[2], atol=1e-10, rtol=1e-9)
    assert feats[1].shape == (x.shape[0], net.dim)
    (v.pow(2).sum() + vz.pow(2).sum() + feats[1].sum()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_harmonic_prior_matches_its_covariance_and_has_zero_com(batch):
    prior = HarmonicPrior(alpha=1.0)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([prior.sample(batch, gen, torch.float64) for _ in range(4000)])  # [S, T, 3]
    com = torch.stack([remove_mean(s, batch.batch, batch.num_graphs) - s for s in samples[:10]])
    assert com.abs().max() < 1e-12
    # first molecule: covariance of x along one axis must be the pseudo-inverse of its Laplacian
    n0 = int((batch.batch == 0).sum())
    local = batch.bond_index[:, batch.bond_index[0] < n0]
    L = bond_laplacian(n0, local)
    emp = torch.cov(samples[:, :n0, 0].T)
    torch.testing.assert_close(emp, torch.linalg.pinv(L), atol=0.08, rtol=0.0)
    # bonded atoms are about one unit apart: E|x_i - x_j|^2 = 3 (L^+_ii + L^+_jj - 2 L^+_ij)
    i, j = local[:, 0].tolist()
    Lp = torch.linalg.pinv(L)
    expect = 3 * (Lp[i, i] + Lp[j, j] - 2 * Lp[i, j])
    got = (samples[:, i] - samples[:, j]).pow(2).sum(-1).mean()
    assert abs(float(got - expect)) < 0.1 * float(expect)
    with pytest.raises(ValueError, match="alpha"):
        HarmonicPrior(alpha=0.0)


def test_harmonic_prior_disconnected_fragments():
    from molecular.conformers import make_record

    rec = make_record("CC.O", num_confs=1, max_confs=1)  # two fragments: extra zero mode gets unit variance
    b = collate_molecules([(rec, rec.conformers[0], 0, 0)])
    vec, s = HarmonicPrior().scales(rec.num_atoms, rec.bond_index)
    assert s[0] == 0 and (s[1:] > 0).all()
    x = HarmonicPrior().sample(b, torch.Generator().manual_seed(0), torch.float64)
    assert torch.isfinite(x).all() and x.mean(0).abs().max() < 1e-12


def test_gaussian_prior_zero_com(batch):
    x = GaussianPrior(std=2.0).sample(batch, torch.Generator().manual_seed(0), torch.float64)
    assert (remove_mean(x, batch.batch, batch.num_graphs) - x).abs().max() < 1e-12
    assert 1.3 < float(x.std()) < 2.5
