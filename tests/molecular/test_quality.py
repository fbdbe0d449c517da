"""molecular.quality: forces of every adapter against the packages' own force paths; force MAE on a labelled set
equals the graph nets' own evaluation; encoders without energies have no quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from molecular.descriptors import RadialAngularHistogram
from molecular.graphnets import GraphNetEncoder, MoleculeSet, SchNet, evaluate_forces
from molecular.quality import HARTREE_EV, force_mae, predict_forces


def _batch(mols):
    class B:
        pass

    b = B()
    b.numbers = torch.as_tensor(np.concatenate([m.numbers for m in mols]))
    b.positions = torch.as_tensor(np.concatenate([m.positions for m in mols]), dtype=torch.float32)
    b.ptr = torch.as_tensor(np.cumsum([0] + [len(m) for m in mols]))
    return b


def test_ani_member_forces_equal_torchani_single_member_forces():
    pytest.importorskip("torchani")
    from molecular.teachers.external import ANIEncoder, _load_ani

    mols = [molecule("CH3CH2OH"), molecule("HCOOH")]
    mols[0].rattle(0.05, seed=1)
    enc = ANIEncoder("ANI1x", member=3)
    got = predict_forces(enc, _batch(mols))
    member = _load_ani("ANI1x")[3]  # torchani's own single-member model (energy shifter included)
    for m, f in zip(mols, got, strict=True):
        z = torch.as_tensor(m.numbers)[None]
        pos = torch.as_tensor(m.positions, dtype=torch.float32)[None].requires_grad_(True)
        with torch.enable_grad():
            e = member((z, pos)).energies.sum()
            (g,) = torch.autograd.grad(e, pos)
        assert np.allclose(f, -g[0].double().numpy() * HARTREE_EV, atol=1e-4)


def test_materials_adapters_give_finite_forces_per_atom():
    mols = [molecule("CH3CH2OH"), molecule("CH3CONH2")]
    for name in ("chgnet", "diep"):
        pytest.importorskip(name)
    from molecular.teachers.external import CHGNetEncoder, DIEPEncoder

    for enc in (CHGNetEncoder("0.3.0"), DIEPEncoder()):
        forces = predict_forces(enc, _batch(mols))
        assert [f.shape for f in forces] == [(9, 3), (9, 3)]
        assert all(np.isfinite(f).all() for f in forces)
        # a molecule in vacuum: the forces sum to ~0 (no external field)
        assert all(np.abs(f.sum(0)).max() < 0.05 for f in forces)


def test_force_mae_equals_the_graph_nets_own_evaluation(tmp_path):
    data = MoleculeSet(["CCO", "CN"], num_confs=1, num_displacements=4, cache_dir=str(tmp_path), split="all")
    enc = GraphNetEncoder(SchNet(hidden=16, num_layers=2), seed=0)
    assert force_mae(enc, data, batch_size=3) == pytest.approx(evaluate_forces(enc.model, data)["force_mae"], rel=1e-6)
    assert force_mae(RadialAngularHistogram(species=[1, 6, 7, 8]), data) is None
    # any encoder with predict_forces(atoms_list) takes the test; one that returns the labels scores 0
    labels = {i: data[i].forces.numpy() for i in range(len(data))}

    class Oracle:
        def predict_forces(self, atoms):
            out, k = [], Oracle.seen
            for _ in atoms:
                out.append(labels[k])
                k += 1
            Oracle.seen = k
            return out

    Oracle.seen = 0
    assert force_mae(Oracle(), data, batch_size=2) == pytest.approx(0.0, abs=1e-6)
