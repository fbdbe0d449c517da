"""Equivariant velocity network, priors, conformer flow task: symmetries in float64, zero CoM, training, sampling."""

import numpy as np
import pytest
import torch
from scipy.stats import special_ortho_group

from molecular.conformers import ConformerDataset, collate_molecules
from molecular.conformers.data import NUM_ATOM_FEATURES
from molecular.flows import GaussianPrior, HarmonicPrior, bond_laplacian, egnn_tiny, remove_mean


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
        numbers=batch.numbers[perm],
        atom_types=batch.atom_types[perm],
        atom_features=batch.atom_features[perm],
        positions=batch.positions[perm],
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
    x = torch.randn(batch.positions.shape, dtype=torch.float64)
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
    x = batch.positions.double()
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


# -- tasks ----------------------------------------------------------------------------------------------------


class _Data:
    def __init__(self, train, val):
        self.train, self.val = train, val


def _train_two_steps(task, data):
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    logs = []
    for step in range(2):
        b = collate_molecules([data[i] for i in range(len(data))])
        out = task(b, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        logs.append({k: float(v.detach()) for k, v in out.items()})
    return logs


def test_conformer_flow_trains_samples_zero_com_and_evaluates(data, tmp_path):
    from molecular.flows.task import ConformerFlowTask

    torch.manual_seed(0)
    task = ConformerFlowTask(
        egnn_tiny(NUM_ATOM_FEATURES), prior=HarmonicPrior(), sample_steps=4, eval_max_molecules=2, sample_smiles=["CCO"]
    )
    logs = _train_two_steps(task, data)
    assert all(np.isfinite(v) for log in logs for v in log.values()) and "loss/flow" in logs[0]
    out = task.generate(data.records[:2], [3, 2], seed=0)
    assert [o.shape for o in out] == [(3, data.records[0].num_atoms, 3), (2, data.records[1].num_atoms, 3)]
    for o in out:
        assert np.abs(o.mean(axis=1)).max() < 1e-5  # zero centre of mass preserved by the sampler
    m = task.evaluate(_Data(data, data), tmp_path, step=2)
    assert 0.0 <= m["conf/cov_r_mean"] <= 1.0 and m["conf/mat_r_mean"] > 0 and "conf/valid_graph" in m
    assert (tmp_path / "eval" / "step_00000002" / "generated.sdf").exists()
    s = task.sample(tmp_path / "samples", num=2, seed=0)
    assert s["num_structures"] == 2 and (tmp_path / "samples" / "conformers.sdf").exists()
    with pytest.raises(ValueError, match="invalid SMILES"):
        task.sample(tmp_path / "bad", num=1, seed=0, smiles=["C1CC"])
    with pytest.raises(ValueError, match="unknown prior"):
        ConformerFlowTask(egnn_tiny(NUM_ATOM_FEATURES), prior="uniform")


def test_sampling_is_equivariant_float64(batch):
    from unirep.flow import sample_ode

    torch.manual_seed(0)
    net = egnn_tiny(NUM_ATOM_FEATURES).double()
    for layer in net.layers:
        torch.nn.init.normal_(layer.coord_mlp[-1].weight, std=0.3)
    x1 = HarmonicPrior().sample(batch, torch.Generator().manual_seed(0), torch.float64)
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=5))

    def project(x):
        return remove_mean(x, batch.batch, batch.num_graphs)

    def fn(x, t):
        return net(batch, x, t)

    a = sample_ode(fn, x1, steps=5, method="heun", project=project)
    b = sample_ode(fn, x1 @ R.T, steps=5, method="heun", project=project)
    torch.testing.assert_close(b, a @ R.T, atol=1e-9, rtol=1e-8)
    assert (project(a) - a).abs().max() < 1e-12


def test_conformer_repa_aligns_a_layer_to_a_frozen_teacher(data):
    from molecular.flows.task import ConformerFlowTask
    from molecular.teachers import random_mace_teacher

    torch.manual_seed(0)
    teacher = random_mace_teacher([1, 6, 7, 8], r_max=4.0)
    net = egnn_tiny(NUM_ATOM_FEATURES)
    task = ConformerFlowTask(net, teacher=teacher, align_layer=1, align_stop_step=1, projector_hidden=32)
    aligner = task.aligner
    b = collate_molecules([data[i] for i in range(len(data))])
    out = task(b, 0)
    assert {"loss/align", "align/cos", "loss/flow"} <= set(out)
    expect = float(out["loss/flow"]) + 0.5 * float(out["loss/align"])
    assert float(out["loss"].detach()) == pytest.approx(expect, rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in aligner.parameters())
    assert net.layers[0].node_mlp[0].weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in teacher.parameters())
    late = task(b, 5)  # StopAtStep(0.5, 1): no alignment from step 1 on
    assert float(late["align/weight"]) == 0.0
    assert float(late["loss"].detach()) == pytest.approx(float(late["loss/flow"]), rel=1e-6)
    with pytest.raises(ValueError, match="align_layer=7"):
        ConformerFlowTask(egnn_tiny(NUM_ATOM_FEATURES), teacher=teacher, align_layer=7)


def test_latent_flow_trains_and_samples(data):
    from molecular.flows.latent import LatentFlowTask
    from molecular.tokenizers import local_ae_tiny

    torch.manual_seed(0)
    ae = local_ae_tiny(latent_dim=4)
    task = LatentFlowTask(egnn_tiny(NUM_ATOM_FEATURES, latent_dim=4), tokenizer=ae, sample_steps=3)
    logs = _train_two_steps(task, data)
    assert "loss/latent" in logs[0] and all(np.isfinite(v) for log in logs for v in log.values())
    assert bool(task.stats_ready) and not any(p.requires_grad for p in ae.parameters())
    out = task.generate(data.records[:1], [2], seed=1)
    assert out[0].shape == (2, data.records[0].num_atoms, 3) and np.abs(out[0].mean(1)).max() < 1e-5
    with pytest.raises(ValueError, match="latent_dim"):
        LatentFlowTask(egnn_tiny(NUM_ATOM_FEATURES, latent_dim=3), tokenizer=local_ae_tiny(latent_dim=4))


def test_quickstart_recipe_trains_evaluates_and_samples(tmp_path):
    """The issue's "done when" path on a smoke budget (every recipe's 2-step run is in tests/unirep/test_configs.py)."""
    from unirep.cli import compose, run_sample, run_train

    name = "conformer_quickstart"
    base = compose("train", [f"experiment=molecular/{name}"])
    cfg = compose("train", [f"experiment=molecular/{name}", "trainer.max_steps=2", f"out_dir={tmp_path}", *base.smoke])
    res = run_train(cfg)
    assert res["step"] == 2 and 0.0 <= res["eval"]["conf/cov_r_mean"] <= 1.0
    assert all(np.isfinite(v) for v in res["eval"].values() if isinstance(v, float))
    # unirep-sample rebuilds the task from the checkpoint and writes SDF + extxyz
    s = run_sample(compose("sample", [f"checkpoint={tmp_path}", "num=2", "+sample.smiles=[CCOC]", "device=cpu"]))
    assert s["num_structures"] == 2 and (tmp_path / "samples" / "conformers.extxyz").exists()


def test_egnn_time_embedding_is_the_shared_one_at_1000_t():
    import math

    from unirep.nn import timestep_embedding

    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    emb = timestep_embedding(t, 7, scale=1000.0)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3, dtype=torch.float64) / 3)
    args = 1000.0 * t[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args), torch.zeros(3, 1, dtype=torch.float64)], dim=-1)
    assert emb.dtype == torch.float64 and torch.equal(emb, expected)
