"""molecular.graphnets: SchNet and PaiNN are invariant/equivariant, forces are -dE/dr, every parameter trains,
training lowers the held-out force error, checkpoints round-trip, and per-layer features feed unirep.converge."""

from __future__ import annotations

import pytest
import torch

from molecular.data import AtomsDataset, Structure, collate_graphs
from molecular.graphnets import GraphNetEncoder, MoleculeSet, PaiNN, SchNet, evaluate_forces, train_graphnet

_SMILES = ["CCO", "CC(=O)N", "OC=O", "CN"]


def _batch(seed: int = 0, rot: torch.Tensor | None = None, perm: bool = False, shift: float = 0.0):
    """Two molecules (ethanol-like and a small amide) with fixed coordinates, optionally rotated/permuted."""
    g = torch.Generator().manual_seed(seed)
    structs = []
    for n, zs in ((9, [6, 6, 8, 1, 1, 1, 1, 1, 1]), (6, [6, 8, 7, 1, 1, 1])):
        pos = torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.2
        if rot is not None:
            pos = pos @ rot.T
        pos = pos + shift
        z = torch.tensor(zs)
        if perm:
            p = torch.randperm(n, generator=torch.Generator().manual_seed(7))
            pos, z = pos[p], z[p]
        structs.append(Structure(z.numpy(), pos.numpy()))
    ds = AtomsDataset(structs, r_max=5.0, require_labels=False)
    return collate_graphs([ds[i] for i in range(len(ds))])


def _rotation(seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


@pytest.mark.parametrize("cls", [SchNet, PaiNN])
def test_symmetries_and_forces(cls):
    torch.manual_seed(0)
    model = cls(hidden=16, num_layers=2).double().eval()
    rot = _rotation()
    b, br, bp = _batch(), _batch(rot=rot, shift=3.0), _batch(perm=True)
    out, outr, outp = model(b), model(br), model(bp)
    # E(3): energies invariant, forces rotate with the structure
    assert torch.allclose(out["energy"], outr["energy"], atol=1e-10)
    assert torch.allclose(out["forces"] @ rot.T, outr["forces"], atol=1e-9)
    # permutation: same energy, per-layer features permuted with the atoms
    assert torch.allclose(out["energy"], outp["energy"], atol=1e-10)
    feats = model.forward_intermediates(b)
    featsr = model.forward_intermediates(br)
    assert len(feats) == 3 and all(f.x.shape == (15, 16) for f in feats)
    assert all(torch.allclose(f.x, fr.x, atol=1e-9) for f, fr in zip(feats, featsr, strict=True))
    # forces are minus the finite-difference gradient of the energy
    eps, atom, axis = 1e-5, 4, 1
    plus, minus = _batch(), _batch()
    plus.positions[atom, axis] += eps
    minus.positions[atom, axis] -= eps
    fd = -(model(plus, compute_forces=False)["energy"].sum() - model(minus, compute_forces=False)["energy"].sum())
    assert float(fd / (2 * eps)) == pytest.approx(float(out["forces"][atom, axis]), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("cls", [SchNet, PaiNN])
def test_every_parameter_gets_a_gradient(cls):
    torch.manual_seed(0)
    model = cls(hidden=16, num_layers=2).train()
    out = model(_batch())
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_training_lowers_heldout_force_error_and_checkpoints_roundtrip(tmp_path):
    data_kw = {"smiles": _SMILES, "num_confs": 1, "num_displacements": 12, "cache_dir": str(tmp_path / "data")}
    train, val = MoleculeSet(**data_kw, split="train"), MoleculeSet(**data_kw, split="val")
    assert len(train) > len(val) > 0
    assert not set(s.id for s in train.structures) & set(s.id for s in val.structures)
    torch.manual_seed(0)
    model = PaiNN(hidden=16, num_layers=2)
    train_graphnet(model, train, steps=0)  # fits the reference energies only
    before = evaluate_forces(model, val)["force_mae"]
    after = train_graphnet(model, train, val, steps=60, batch_size=8)["force_mae"]
    assert after < 0.8 * before

    train_cfg = {"data": data_kw, "steps": 20, "batch_size": 8}
    enc = GraphNetEncoder(SchNet(hidden=16, num_layers=2), checkpoint=str(tmp_path / "ck"), train=train_cfg, seed=3)
    assert enc.quality == pytest.approx(enc.meta["force_mae"]) and enc.quality > 0
    sample = val.collate([val[i] for i in range(3)])
    layers = enc.encode_layers(sample)
    assert enc.layer_names == ["embed", "interaction1", "interaction2"] and len(layers) == 3
    assert layers[0].num_items == 3 and layers[0].x.shape[0] == int(sample.num_atoms.sum())
    again = GraphNetEncoder(SchNet(hidden=16, num_layers=2), checkpoint=str(tmp_path / "ck"), train=train_cfg, seed=3)
    assert again.quality == enc.quality  # loaded, not retrained
    for a, b in zip(layers, again.encode_layers(sample), strict=True):
        assert torch.equal(a.x, b.x)
    # a checkpoint of another size names the mismatch; a missing one without training names the path
    with pytest.raises(ValueError, match="does not fit SchNet"):
        GraphNetEncoder(SchNet(hidden=8, num_layers=2), checkpoint=str(tmp_path / "ck"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GraphNetEncoder(SchNet(hidden=16), checkpoint=str(tmp_path / "nowhere"))
    # the data set speaks the converge protocol: groups are the atomic numbers of each structure
    assert torch.equal(val.token_groups(0), val[0].numbers)
    assert val.fingerprint() != train.fingerprint()


def test_random_floor_depends_on_seed():
    b = _batch()
    a = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).encode(b)
    c = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).encode(b)
    d = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=1).encode(b)
    assert torch.equal(a.x, c.x) and not torch.allclose(a.x, d.x)
    assert GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).quality is None
