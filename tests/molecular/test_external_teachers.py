"""molecular.teachers.external and molecular.descriptors: the adapters return the models' own per-atom features
(checked against the packages' own outputs), in structure order, invariant to rotation and translation; the
hand-written descriptor matches its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import molecule

from molecular.descriptors import RadialAngularHistogram, cosine_cutoff
from molecular.teachers.external import as_atoms_list


def _mols(rotate: bool = False):
    mols = [molecule("CH3CH2OH"), molecule("CH3CONH2"), molecule("HCOOH")]
    if rotate:
        for k, m in enumerate(mols):
            m.rotate(37.0 + 20 * k, (1.0, 0.3, -0.5), center="COM")
            m.translate((1.5, -2.0, 0.7))
    return mols


def _check_layers(layers, counts, dims=None):
    for k, ts in enumerate(layers):
        assert ts.num_items == len(counts)
        assert ts.counts.tolist() == counts
        assert torch.isfinite(ts.x).all()
        if dims is not None:
            assert ts.x.shape[1] == dims[k]


def test_ani_member_features_reproduce_the_member_energy():
    pytest.importorskip("torchani")
    from molecular.teachers.external import ANIEncoder, _load_ani

    enc = ANIEncoder("ANI1x", member=5)
    mols = _mols()
    layers = enc.encode_layers(mols)
    _check_layers(layers, [len(m) for m in mols], [384, 96])
    # the final Linear of each element network applied to the 'hidden' features, summed per molecule, is the
    # member's energy (before self-energies) as torchani computes it
    ani = _load_ani("ANI1x")
    hidden = layers[1].x
    species = torch.cat([torch.as_tensor(m.numbers) for m in mols])
    per_atom = torch.zeros(len(species))
    for z, net in zip((1, 6, 7, 8), enc.network.values(), strict=True):
        sel = species == z
        per_atom[sel] = net[-1](hidden[sel]).squeeze(-1)
    mine = torch.zeros(len(mols)).index_add_(0, layers[1].batch, per_atom)
    for j, m in enumerate(mols):
        z = torch.as_tensor(m.numbers)[None]
        pos = torch.as_tensor(m.positions, dtype=torch.float32)[None]
        sp = ani.species_converter((z, pos))
        aev = ani.aev_computer(sp)
        ref = ani.neural_networks[5](aev).energies
        assert float(mine[j]) == pytest.approx(float(ref), abs=1e-4)
    # rotation/translation invariant; members differ, the AEV layer is shared
    rot = enc.encode_layers(_mols(rotate=True))
    assert torch.allclose(rot[1].x, hidden, atol=1e-4)
    other = ANIEncoder("ANI1x", member=0).encode_layers(mols)
    assert torch.equal(other[0].x, layers[0].x) and not torch.allclose(other[1].x, hidden)
    with pytest.raises(ValueError, match="H, C, N, O"):
        enc.encode_layers([molecule("SiH4")])


def test_chgnet_layers_match_its_own_atom_features():
    pytest.importorskip("chgnet")
    from pymatgen.io.ase import AseAtomsAdaptor

    from molecular.teachers.external import CHGNetEncoder, _boxed

    enc = CHGNetEncoder("0.3.0")
    mols = _mols()
    layers = enc.encode_layers(mols)
    _check_layers(layers, [len(m) for m in mols], [64] * 5)
    assert enc.layer_names[0] == "embed" and enc.num_layers == 4
    ref = enc.model.predict_structure(AseAtomsAdaptor.get_structure(_boxed(mols[1], enc.gap)), return_atom_feas=True)
    # CHGNet's own atom_fea is the output of the second-to-last conv layer (where it reads magnetic moments)
    got = layers[-2].x[layers[-2].batch == 1]
    assert np.allclose(got.numpy(), ref["atom_fea"], atol=1e-5)
    rot = enc.encode_layers(_mols(rotate=True))
    assert torch.allclose(rot[-1].x, layers[-1].x, atol=1e-4)


def test_diep_layers_invariant_and_in_order():
    pytest.importorskip("diep")
    from molecular.teachers.external import DIEPEncoder

    enc = DIEPEncoder()
    mols = _mols()
    layers = enc.encode_layers(mols)
    _check_layers(layers, [len(m) for m in mols], [64] * len(enc.layer_names))
    rot = enc.encode_layers(_mols(rotate=True))
    assert torch.allclose(rot[-1].x, layers[-1].x, atol=1e-4)
    single = enc.encode_layers([mols[2]])
    assert torch.allclose(single[-1].x, layers[-1].x[layers[-1].batch == 2], atol=1e-5)


def test_radial_angular_histogram_closed_form_and_symmetries():
    d = RadialAngularHistogram(species=(1, 8), r_cut=4.0, n_radial=9, n_angular=7)
    # H2 at 0.74 Å: each atom sees one H neighbour; no angles (a single neighbour)
    h2 = molecule("H2")
    x = d.encode(h2).x.double()
    r = torch.tensor(float(np.linalg.norm(h2.positions[0] - h2.positions[1])), dtype=torch.float64)
    mu = torch.linspace(0, 4.0, 9, dtype=torch.float64)
    expect_h = torch.exp(-((r - mu) ** 2) / (2 * 0.5**2)) * cosine_cutoff(r, 4.0)
    assert torch.allclose(x[0, :9], expect_h.float().double(), atol=1e-6)
    assert torch.all(x[:, 9:18] == 0) and torch.all(x[:, 18:] == 0)  # no O neighbours, no angles
    # water: O's angular part peaks at the H-O-H angle
    w = molecule("H2O")
    xo = d.encode(w).x[0]
    b1, b2 = w.positions[1] - w.positions[0], w.positions[2] - w.positions[0]
    angle = math.acos(np.dot(b1, b2) / (np.linalg.norm(b1) * np.linalg.norm(b2)))
    centres = torch.linspace(0, math.pi, 7)
    assert int(torch.argmax(xo[18:])) == int(torch.argmin((centres - angle).abs()))
    # rotation/translation invariant, permutation equivariant
    m, mr = _mols()[0], _mols(rotate=True)[0]
    d2 = RadialAngularHistogram()
    a, b = d2.encode(m).x, d2.encode(mr).x
    assert torch.allclose(a, b, atol=1e-5)
    p = np.random.default_rng(0).permutation(len(m))
    assert torch.allclose(d2.encode(m[p]).x, a[p], atol=1e-6)
    with pytest.raises(ValueError, match="atomic numbers \\[14\\] outside species"):
        d2.encode(molecule("SiH4"))


def test_soap_and_acsf_through_dscribe():
    pytest.importorskip("dscribe")
    from molecular.descriptors import ACSFDescriptor, SOAPDescriptor

    mols = _mols()
    for enc in (SOAPDescriptor(n_max=3, l_max=2), ACSFDescriptor()):
        ts = enc.encode(mols)
        assert ts.x.shape == (sum(len(m) for m in mols), enc.dim)
        assert torch.allclose(enc.encode(_mols(rotate=True)).x, ts.x, atol=1e-4)


def test_atoms_list_from_graph_batch():
    from molecular.data import AtomsDataset, Structure, collate_graphs

    mols = _mols()
    ds = AtomsDataset([Structure.from_atoms(m) for m in mols], r_max=4.0, require_labels=False)
    atoms = as_atoms_list(collate_graphs([ds[i] for i in range(3)]))
    assert [len(a) for a in atoms] == [len(m) for m in mols]
    assert np.allclose(atoms[1].positions, mols[1].positions)


def test_so3lr_invariant_features_when_installed():
    pytest.importorskip("so3krates_torch")
    from molecular.teachers.external import SO3LREncoder

    before = torch.get_default_dtype()
    enc = SO3LREncoder()
    assert torch.get_default_dtype() == before  # loading SO3LR must not leak a global dtype change
    mols = _mols()
    layers = enc.encode_layers(mols)
    _check_layers(layers, [len(m) for m in mols], [128])
    ref = enc.calc.get_descriptors(mols[1])["invariant_features"][0]
    assert np.allclose(layers[0].x[layers[0].batch == 1].numpy(), ref, atol=1e-5)
    assert torch.allclose(enc.encode(_mols(rotate=True)).x, layers[0].x, atol=1e-3)
