"""molecular.graphnets: SchNet and PaiNN are invariant/equivariant, forces are -dE/dr, every parameter trains,
training lowers the held-out force error, checkpoints round-trip, and per-layer features feed unirep.converge."""

from __future__ import annotations

import pytest
import torch

from molecular.data import AtomsDataset, Structure, collate_graphs
from molecular.graphnets import GRAPHNET_DATA, GraphNetEncoder, MoleculeSet, PaiNN, SchNet, evaluate_forces

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
    out_i, feats = model.forward_intermediates(b)
    _, featsr = model.forward_intermediates(br)
    assert len(feats) == 3 and all(f.x.shape == (15, 16) for f in feats) and model.num_layers == 2
    assert torch.allclose(out_i["energy"], out["energy"]) and torch.allclose(out_i["forces"], out["forces"])
    _, (last,) = model.forward_intermediates(b, [-1], compute_forces=False)
    assert torch.allclose(last.x, feats[2].x) and model.feature_dim(-1) == 16
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


def test_graphnet_recipe_trains_exports_and_the_encoder_only_loads(tmp_path, monkeypatch):
    """experiment=molecular/graphnet on the one Trainer lowers the held-out force error and exports a checkpoint that
    GraphNetEncoder loads (its quality = the held-out force MAE); a missing checkpoint stops with the exact command,
    whose overrides make exactly that checkpoint; a checkpoint of another size or settings is refused by name."""
    import shlex
    from pathlib import Path

    from unirep.cli import compose, run_train

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    data_kw = {
        **GRAPHNET_DATA,
        "smiles": _SMILES,
        "num_confs": 1,
        "num_displacements": 12,
        "cache_dir": str(tmp_path / "data"),
    }
    train_cfg = {"data": data_kw, "steps": 60, "batch_size": 8}
    ck = tmp_path / "ck"
    with pytest.raises(FileNotFoundError, match="experiment=molecular/graphnet") as err:
        GraphNetEncoder(SchNet(hidden=16, num_layers=2), checkpoint=str(ck), train=train_cfg, seed=3)
    command = str(err.value).split("\n")[1].strip()
    overrides = shlex.split(command)[1:]
    assert "task.model._target_=molecular.graphnets.SchNet" in overrides and f"task.export={ck}" in overrides
    cfg = compose(
        "train",
        [
            *overrides,
            f"out_dir={tmp_path / 'run'}",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "trainer.num_threads=1",
        ],
    )
    result = run_train(cfg)
    enc = GraphNetEncoder(SchNet(hidden=16, num_layers=2), checkpoint=str(ck), train=train_cfg, seed=3)
    assert enc.quality == pytest.approx(result["eval"]["force_mae"]) and enc.quality > 0
    # the references alone (0 steps) are worse than the trained model on the held-out split
    val = MoleculeSet(**data_kw, split="val")
    floor = SchNet(hidden=16, num_layers=2)
    floor.atomic_energies.copy_(enc.model.atomic_energies)
    floor.scale.copy_(enc.model.scale)
    assert enc.quality < 0.8 * evaluate_forces(floor, val)["force_mae"]
    sample = val.collate([val[i] for i in range(3)])
    layers = enc.encode_layers(sample)
    assert enc.layer_names == ["embed", "interaction1", "interaction2"] and len(layers) == 3 and enc.num_layers == 2
    assert layers[0].num_items == 3 and layers[0].x.shape[0] == int(sample.num_atoms.sum())
    torch.testing.assert_close(enc.forward_intermediates(sample, [-1])[1][0].x, layers[-1].x)
    assert len(enc.item_digests(sample)) == 3
    with pytest.raises(ValueError, match="does not fit SchNet"):
        GraphNetEncoder(SchNet(hidden=8, num_layers=2), checkpoint=str(ck))
    with pytest.raises(ValueError, match="other settings"):
        GraphNetEncoder(SchNet(hidden=16, num_layers=2), checkpoint=str(ck), train={**train_cfg, "steps": 61}, seed=3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GraphNetEncoder(SchNet(hidden=16), checkpoint=str(tmp_path / "nowhere"))
    # the data set speaks the converge protocol: groups are the atomic numbers of each structure
    assert torch.equal(val.token_groups(0), val[0].numbers)


def test_graphnet_recipe_defaults_are_the_encoder_defaults():
    from unirep.cli import compose

    cfg = compose("train", ["experiment=molecular/graphnet"])
    data = {k: (list(v) if k == "smiles" else v) for k, v in cfg.data.items() if k != "_target_"}
    assert data == GRAPHNET_DATA


def test_random_floor_depends_on_seed():
    b = _batch()
    a = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).encode(b)
    c = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).encode(b)
    d = GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=1).encode(b)
    assert torch.equal(a.x, c.x) and not torch.allclose(a.x, d.x)
    assert GraphNetEncoder(PaiNN(hidden=16, num_layers=2), seed=0).quality is None
