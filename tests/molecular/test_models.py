"""MACEModel: E(3) equivariance in float64, forces = -grad E, dtype isolation, intermediates as token sets."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.data import AtomicGraph, Structure, collate_graphs, read_structures
from molecular.models import MACEModel, default_dtype, fit_atomic_energies, fit_scale_shift

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"
R_MAX = 4.0


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return MACEModel(
        [1, 6, 8],
        r_max=R_MAX,
        num_channels=8,
        max_L=1,
        num_interactions=2,
        max_ell=2,
        correlation=2,
        radial_mlp=(16,),
        mlp_irreps="8x0e",
        dtype="float64",
        atomic_energies=[-13.0, -48.0, -71.0],
    )


@pytest.fixture(scope="module")
def ethanol():
    return read_structures(SAMPLE / "md_ethanol.extxyz")[7]


def _batch(structs):
    return collate_graphs([AtomicGraph.from_structure(s, R_MAX) for s in structs])


def _random_orthogonal(seed, reflect):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q))  # a proper rotation
    return q @ np.diag([1, 1, -1]) if reflect else q


def test_global_state_untouched(model64):
    assert torch.get_default_dtype() == torch.float32
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert next(model64.parameters()).dtype == torch.float64
    with pytest.raises(RuntimeError):
        with default_dtype("float64"):
            assert torch.get_default_dtype() == torch.float64
            raise RuntimeError("boom")
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("reflect", [False, True])
def test_e3_equivariance_batched_with_transformed_copy(model64, ethanol, reflect):
    rot = _random_orthogonal(1 + reflect, reflect)
    perm = np.random.default_rng(5).permutation(len(ethanol))
    shift = np.array([1.5, -2.0, 0.7])
    moved = Structure(ethanol.numbers[perm], (ethanol.positions @ rot.T + shift)[perm], id="moved")
    out = model64(_batch([ethanol, moved]), training=False)
    e, f = out["energy"].detach(), out["forces"].detach().numpy()
    n = len(ethanol)
    assert abs(float(e[0] - e[1])) < 1e-9
    # forces rotate with the structure and follow the permutation
    np.testing.assert_allclose(f[n:], (f[:n] @ rot.T)[perm], atol=1e-9)
    # invariant features are invariant, per atom, at every index (0 = embedding, 1..L = interactions)
    _, feats = model64.forward_intermediates(_batch([ethanol, moved]), None, training=False)
    for t in feats:
        np.testing.assert_allclose(t.x[n:].detach().numpy(), t.x[:n].detach().numpy()[perm], atol=1e-9)


def test_forces_are_minus_energy_gradient(model64, ethanol):
    f = model64(_batch([ethanol]), training=False)["forces"].detach().numpy()
    h = 1e-5
    for atom, c in [(0, 0), (3, 1), (8, 2)]:
        es = []
        for sgn in (1, -1):
            p = ethanol.positions.copy()
            p[atom, c] += sgn * h
            es.append(float(model64(_batch([Structure(ethanol.numbers, p)]), compute_forces=False)["energy"].detach()))
        assert f[atom, c] == pytest.approx(-(es[0] - es[1]) / (2 * h), abs=1e-7)


def test_float32_matches_float64(model64, ethanol):
    m32 = MACEModel(**{**model64.config, "dtype": "float32"})
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model64.state_dict().items()})
    b = _batch([ethanol])
    e64 = model64(b, training=False)["energy"].detach()
    e32 = m32(b, training=False)["energy"].detach()
    assert e32.dtype == torch.float32
    assert float(e32) == pytest.approx(float(e64), abs=1e-3)


def test_intermediates_contract_shapes_and_backward(model64, ethanol):
    b = _batch([ethanol, ethanol])
    assert model64.num_layers == 2 and model64.layer_names == ["embedding", "interaction1", "interaction2"]
    out, inv = model64.forward_intermediates(b, None, training=False)
    assert [t.dim for t in inv] == [8, 8, 8] and [model64.feature_dim(i) for i in (0, 1, 2, -1)] == [8, 8, 8, 8]
    _, full = model64.forward_intermediates(b, [1], features="full", training=False)
    assert full[0].dim == 8 * 4 == model64.feature_dim(1, "full")  # 8x0e + 8x1o
    _, norms = model64.forward_intermediates(b, [1], features="norms", training=False)
    assert norms[0].dim == 16 == model64.feature_dim(1, "norms")  # 8 scalars + 8 vector norms
    assert model64.equivariant_at(1, "full") and not model64.equivariant_at(1, "norms")
    assert inv[0].num_items == 2 and torch.equal(inv[0].batch, b.batch)
    # out is what forward returns, from the same pass
    ref = model64(b, training=False)
    torch.testing.assert_close(out["energy"], ref["energy"])
    torch.testing.assert_close(out["forces"], ref["forces"])
    # negative indices count from the end; 0 is the node embedding (a linear map of the one-hot species)
    _, (last, first) = model64.forward_intermediates(b, [-1, -3], training=False)
    torch.testing.assert_close(last.x, inv[2].x) and torch.testing.assert_close(first.x, inv[0].x)
    assert torch.equal(inv[0].x[: len(ethanol)], inv[0].x[len(ethanol) :])
    with pytest.raises(ValueError, match="outside the MACE model's layers"):
        model64.forward_intermediates(b, indices=[3])
    # training forward: every parameter gets a finite gradient from an energy + force loss + a feature loss
    model64.train()
    out, feats = model64.forward_intermediates(b, [1])
    loss = out["energy"].square().sum() + out["forces"].square().mean() + feats[0].x.square().mean()
    loss.backward()
    model64.eval()
    for name, p in model64.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model64.zero_grad()


@pytest.mark.parametrize("reflect", [False, True])
def test_invariant_contraction_is_rotation_invariant_in_float64(model64, ethanol, reflect):
    """Per-irrep norms of the l >= 1 channels (features="norms") are O(3) invariant to 1e-10 in float64; the full
    irreps are not (they rotate), which is why aligning them to an invariant teacher is refused."""
    rot = _random_orthogonal(11 + reflect, reflect)
    moved = Structure(ethanol.numbers, ethanol.positions @ rot.T + 0.3)
    b = _batch([ethanol, moved])
    n = len(ethanol)
    _, (norms,) = model64.forward_intermediates(b, [1], features="norms", training=False)
    np.testing.assert_allclose(norms.x[n:].detach().numpy(), norms.x[:n].detach().numpy(), atol=1e-10)
    _, (full,) = model64.forward_intermediates(b, [1], features="full", training=False)
    assert (full.x[n:] - full.x[:n]).abs().max() > 1e-3
    # the norms' gradient is finite even where a vector channel vanishes
    x = torch.zeros(3, 8 * 4, dtype=torch.float64, requires_grad=True)
    from molecular.models import contract_irreps

    contract_irreps(x, model64.layer_irreps[1], "norms").sum().backward()
    assert torch.isfinite(x.grad).all()


def _mace_run_train_model(z_table, atomic_energies, scale, avg_num_neighbors):
    """A ScaleShiftMACE built as mace_run_train builds `--model MACE` (mace/tools/model_script_utils.py)."""
    from molecular.models import import_mace

    modules = import_mace()  # first: e3nn's import needs the environment import_mace sets up
    from e3nn import o3

    with default_dtype("float64"):
        return modules.ScaleShiftMACE(
            r_max=R_MAX,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2,
            num_elements=len(z_table),
            hidden_irreps=o3.Irreps("8x0e + 8x1o"),
            atomic_energies=np.asarray(atomic_energies),
            avg_num_neighbors=avg_num_neighbors,
            atomic_numbers=list(z_table),
            correlation=2,
            gate=modules.gate_dict["silu"],
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_inter_scale=scale,
            atomic_inter_shift=[0.0],
            radial_MLP=[16, 16],
            use_reduced_cg=False,
        )


def test_macemodel_equals_scaleshiftmace_both_ways(ethanol):
    """MACEModel vs mace-torch's own ScaleShiftMACE with identical weights: energies and forces agree to 1e-12 in
    float64; weights load across in both directions (E0s [1, n] vs [n], scale [1] vs [])."""
    from molecular.models import load_mace_state

    torch.manual_seed(3)
    theirs = _mace_run_train_model([1, 6, 8], [-13.6, -1029.8, -2041.0], 1.7, 9.5)
    ours = MACEModel.from_mace(theirs)
    assert ours.config["use_reduced_cg"] is False and ours.config["interaction_first"] == "RealAgnosticInteractionBlock"
    assert ours.config["radial_mlp"] == [16, 16] and ours.config["max_ell"] == 2 and ours.z_table == [1, 6, 8]
    b = _batch([ethanol])
    mine = ours(b, training=False)
    ref = theirs(ours._inputs(b), training=False, compute_force=True)
    assert abs(float((mine["energy"] - ref["energy"]).detach())) < 1e-12
    assert float((mine["forces"] - ref["forces"]).abs().max()) < 1e-12
    # the other way: our weights (stored with 1-d E0s and a 0-d scale) into a fresh mace-torch model
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["mace.atomic_energies_fn.atomic_energies"] = state["mace.atomic_energies_fn.atomic_energies"].reshape(-1)
    state["mace.scale_shift.scale"] = state["mace.scale_shift.scale"].reshape(())
    fresh = _mace_run_train_model([1, 6, 8], [0.0, 0.0, 0.0], 1.0, 9.5)
    load_mace_state(fresh, state)
    again = fresh(ours._inputs(b), training=False, compute_force=True)
    assert abs(float((again["energy"] - mine["energy"]).detach())) < 1e-12
    with pytest.raises(ValueError, match="shape"):
        load_mace_state(fresh, {"mace.atomic_energies_fn.atomic_energies": torch.zeros(5)})


def test_unknown_element_is_named(model64):
    s = Structure([1, 9], [[0, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"\[9\] not in the model's z_table"):
        model64(_batch([s]))


def test_statistics_fit_exact_linear_energies():
    rng = np.random.default_rng(0)
    e0 = {1: -13.5, 6: -1030.0, 8: -2040.0}
    structs = []
    for k in range(6):
        nums = rng.choice([1, 6, 8], size=5 + k)
        structs.append(
            Structure(
                nums,
                rng.normal(size=(len(nums), 3)) * 3,
                energy=sum(e0[z] for z in nums) + 0.1,
                forces=np.full((len(nums), 3), 0.5),
            )
        )
    fit = fit_atomic_energies(structs, [1, 6, 8])
    pred = [sum(fit[[1, 6, 8].index(z)] for z in s.numbers) for s in structs]
    np.testing.assert_allclose(pred, [s.energy for s in structs], atol=0.2)
    scale, shift = fit_scale_shift(structs, [1, 6, 8], [e0[1], e0[6], e0[8]])
    assert scale == pytest.approx(0.5) and shift == pytest.approx(np.mean([0.1 / len(s) for s in structs]))


def test_statistics_come_from_the_training_split_only(tmp_path):
    """E0s, scale/shift and neighbours are fitted on mace_data's training split: validation frames whose energies
    would move the E0s (shifted by 50 eV here) do not reach them, and neither do frames n_train leaves out."""
    from dataclasses import replace

    from molecular.data import train_val_split, write_extxyz
    from molecular.task import MaceTask, mace_data

    frames = read_structures(SAMPLE / "md_ethanol.extxyz")[:16]
    write_extxyz(frames, tmp_path / "clean.extxyz")
    split = {"n_val": 4, "n_train": 8, "seed": 3}
    train_ids = {s.id for s in train_val_split(tmp_path / "clean.extxyz", r_max=R_MAX, **split)[0].structures}
    moved = [s if s.id in train_ids else replace(s, energy=s.energy + 50.0) for s in frames]
    path = tmp_path / "moved.extxyz"
    write_extxyz(moved, path)

    data = mace_data(str(path), r_max=R_MAX, z_table=[1, 6, 8], cache_dir=None, **split)
    assert {s.id for s in data.train.structures} == train_ids and len(data.val) == 4
    train_frames = [s for s in moved if s.id in train_ids]

    def e0s(statistics_from):
        torch.manual_seed(0)
        model = MACEModel(
            [1, 6, 8],
            r_max=R_MAX,
            num_channels=4,
            max_L=0,
            num_interactions=1,
            max_ell=1,
            correlation=1,
            radial_mlp=(8,),
            mlp_irreps="4x0e",
            dtype="float64",
        )
        MaceTask(model, statistics_from=statistics_from, statistics=["e0s", "scale_shift", "avg_num_neighbors"])
        return np.array(model.config["atomic_energies"]), model.config["shift"]

    expected = np.array(fit_atomic_energies(train_frames, [1, 6, 8]))
    for source in ({"train": str(path), **split}, data):  # the recipe's mapping, or the DataModule itself
        e0, shift = e0s(source)
        np.testing.assert_allclose(e0, expected, atol=1e-9)
        assert shift == pytest.approx(fit_scale_shift(train_frames, [1, 6, 8], list(expected))[1], abs=1e-9)
    whole, _ = e0s(str(path))  # a plain file: every frame of it, validation included
    assert np.abs(whole - expected).max() > 1.0
