"""The MACE velocity network of the conformer flow and its force-field initialisation (shared backbone): O(3)
equivariance in float64, the trunk loaded bit for bit from a saved force field, zero-initialised conditioning (the
initial trunk features are the force field's own), an unknown element refused by name, one training step."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import special_ortho_group

from molecular.conformers import ConformerDataset, collate_molecules
from molecular.flows import ConformerFlowTask, ForceFieldMACEVelocityNet, MACEVelocityNet, remove_mean
from molecular.models import MACEModel
from molecular.teachers.mace import save_mace_model


def _trunk(z_table=(1, 6, 7, 8), dtype="float64", seed=0, **kw) -> MACEModel:
    torch.manual_seed(seed)
    args = dict(num_channels=8, max_L=1, max_ell=2, correlation=2, radial_mlp=(16,), mlp_irreps="8x0e", dtype=dtype)
    args.update(kw)
    return MACEModel(list(z_table), **args)


def _wake(net: MACEVelocityNet, seed: int = 5) -> MACEVelocityNet:
    """Give the zero-initialised conditioning and bond embedding non-zero weights, so a broken symmetry would show."""
    torch.manual_seed(seed)
    for p in [*net.inject.parameters(), net.bond_embed.weight, *net.vec_mix.parameters(), *net.vec_out.parameters()]:
        torch.nn.init.normal_(p, std=0.5)
    return net


@pytest.fixture(scope="module")
def data():
    return ConformerDataset.from_smiles(["CCO", "CC(=O)N", "c1ccoc1"], num_confs=3, max_confs=2)


@pytest.fixture(scope="module")
def batch(data):
    return collate_molecules([data[i] for i in range(len(data))])


def _perm_batch(batch, perm):
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


def test_velocity_is_o3_equivariant_translation_and_permutation_float64(batch):
    net = _wake(MACEVelocityNet(_trunk(), hidden=16, time_dim=8))
    x = 1.3 * torch.randn(batch.positions.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(batch.num_graphs, dtype=torch.float64, generator=torch.Generator().manual_seed(1))[batch.batch]
    v = net(batch, x, t)
    assert v.dtype == torch.float64 and v.shape == x.shape and v.abs().max() > 1e-3
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=1))
    shift = torch.tensor([1.5, -3.0, 0.7], dtype=torch.float64)
    for Q in (R, -R):  # a rotation and an improper rotation (reflection): O(3)
        torch.testing.assert_close(net(batch, x @ Q.T + shift, t), v @ Q.T, atol=1e-10, rtol=1e-9)
    assert (remove_mean(v, batch.batch, batch.num_graphs) - v).abs().max() < 1e-12  # zero centre of mass
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(net(_perm_batch(batch, perm), x[perm], t[perm]), v[perm], atol=1e-10, rtol=1e-9)
    # time is an input: another time changes the velocity (the test above would pass for a time-blind network)
    assert (net(batch, x, 1.0 - t) - v).abs().max() > 1e-4
    # the bond graph is an input: dropping the bonds changes the velocity
    unbonded = replace(batch, bond_index=batch.bond_index[:, :0], bond_types=batch.bond_types[:0])
    assert (net(unbonded, x, t) - v).abs().max() > 1e-4


def test_intermediates_convention_and_every_trainable_parameter_gets_gradient(batch):
    net = _wake(MACEVelocityNet(_trunk(), hidden=16, time_dim=8))
    x, t = batch.positions.double(), torch.full((batch.positions.shape[0],), 0.4, dtype=torch.float64)
    v, feats = net.forward_intermediates(batch, x, t, [0, 1, -1])
    assert net.num_layers == 2 and len(feats) == 3
    assert all(f.x.shape == (x.shape[0], net.feature_dim(k)) for f, k in zip(feats, [0, 1, 2], strict=True))
    assert len(net.forward_intermediates(batch, x, t, None)[1]) == 3
    with pytest.raises(ValueError, match="outside"):
        net.forward_intermediates(batch, x, t, [3])
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=2))
    _, feats_r = net.forward_intermediates(batch, x @ R.T, t, [0, 1, -1])
    for a, b in zip(feats, feats_r, strict=True):  # scalars mode: invariant tokens
        torch.testing.assert_close(a.x, b.x, atol=1e-10, rtol=1e-9)
    (v.pow(2).sum() + feats[1].x.sum()).backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(".readouts." in n for n in frozen)  # only the energy head is frozen


def test_a_trunk_without_vector_channels_is_refused():
    with pytest.raises(ValueError, match="no 1o .*max_L >= 1"):
        MACEVelocityNet(_trunk(max_L=0))


def test_trunk_loads_bit_for_bit_from_a_saved_force_field(tmp_path, dtype="float32"):  # the foundation's dtype
    ff = _trunk(z_table=(1, 6, 7, 8, 9), dtype=dtype, seed=3)
    ff.set_statistics(atomic_energies=[-13.6, -1029.8, -1484.9, -2041.8, -2713.0], scale=0.7, shift=-0.2)
    folder = save_mace_model(ff, tmp_path / "ff")
    saved = load_file(str(folder / "model.safetensors"))  # the file itself, not what the loader returns
    net = MACEVelocityNet.from_force_field(folder, elements=[1, 6, 8], hidden=16, time_dim=8)
    state = net.trunk.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert net.trunk.z_table == [1, 6, 7, 8, 9] and net.trunk.dtype == getattr(torch, dtype)
    # the class form (the hydra target) loads the same weights
    cls_net = ForceFieldMACEVelocityNet(str(folder), elements=[1, 6, 8], hidden=16, time_dim=8)
    assert all(torch.equal(cls_net.trunk.state_dict()[k], v) for k, v in saved.items())


def test_zero_initialised_conditioning_leaves_the_force_fields_features(tmp_path, batch):
    ff = _trunk(seed=4)
    folder = save_mace_model(ff, tmp_path / "ff")
    net = MACEVelocityNet.from_force_field(folder, hidden=16, time_dim=8, features="full")
    pos = remove_mean(batch.positions.double(), batch.batch, batch.num_graphs)
    # the force field's own forward pass (mace's ScaleShiftMACE on the radius graph), features after each interaction
    _, ref = ff.forward_intermediates(
        batch.radius_graph(ff.r_max, pos), [0, 1, 2], features="full", compute_forces=False
    )
    for t in (0.05, 0.9):
        _, got = net.forward_intermediates(batch, pos, torch.full((pos.shape[0],), t, dtype=torch.float64), [0, 1, 2])
        for k, (a, b) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(a.x, b.x, atol=1e-12, rtol=1e-10, msg=f"layer {k} at t={t}")
    # once the time projection is non-zero the features move with t (so the comparison above can fail)
    _wake(net)
    _, a = net.forward_intermediates(batch, pos, torch.full((pos.shape[0],), 0.05, dtype=torch.float64), [1])
    assert (a[0].x - ref[1].x).abs().max() > 1e-4


def test_an_element_the_force_field_lacks_is_refused_by_name(tmp_path, batch):
    folder = save_mace_model(_trunk(z_table=(1, 6, 8)), tmp_path / "ff_no_n")
    with pytest.raises(ValueError, match=r"does not know element\(s\) N \(Z=7\)"):
        MACEVelocityNet.from_force_field(folder, elements=[1, 6, 7, 8])
    net = MACEVelocityNet.from_force_field(folder)  # no element list: refused on the first batch holding N
    with pytest.raises(ValueError, match=r"element\(s\) N \(Z=7\)"):
        net(batch, batch.positions.double(), torch.zeros(batch.num_graphs, dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="unirep-train experiment=molecular/foundation"):
        MACEVelocityNet.from_force_field(tmp_path / "missing")


def test_one_training_step_of_the_conformer_flow(data, tmp_path):
    folder = save_mace_model(_trunk(dtype="float32", seed=6), tmp_path / "ff")
    net = MACEVelocityNet.from_force_field(folder, hidden=16, time_dim=8)
    task = ConformerFlowTask(net, sample_steps=3, eval_max_molecules=1, sample_smiles=["CCO"])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    out = task(collate_molecules([data[i] for i in range(len(data))]), 0)
    assert torch.isfinite(out["loss"]) and "loss/flow" in out
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    after = dict(net.named_parameters())
    assert not torch.equal(after["inject.0.weight"], before["inject.0.weight"])  # the zero init moves
    assert not torch.equal(after["trunk.mace.products.0.linear.weight"], before["trunk.mace.products.0.linear.weight"])
    assert torch.equal(after["trunk.mace.readouts.0.linear.weight"], before["trunk.mace.readouts.0.linear.weight"])
    gen = task.generate(data.records[:1], [2], seed=0)
    assert gen[0].shape == (2, data.records[0].num_atoms, 3) and np.isfinite(gen[0]).all()
    assert np.abs(gen[0].mean(axis=1)).max() < 1e-5
