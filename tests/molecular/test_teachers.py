"""Atomistic teachers: MACE file formats (project format, trusted pickles), hook adapter, per-structure cache."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from molecular.data import AtomsDataset, read_structures
from molecular.models import MACEModel
from molecular.teachers import (
    AtomsFunctionEncoder,
    HookEncoder,
    MACEEncoder,
    load_mace_model,
    random_mace_teacher,
    save_mace_model,
)
from unirep.encoders import Encoder, FrozenEncoder

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"


@pytest.fixture(scope="module")
def teacher_model():
    torch.manual_seed(1)
    return MACEModel(
        [1, 6, 7, 8, 9],
        r_max=4.5,
        num_channels=8,
        max_L=1,
        num_interactions=2,
        max_ell=2,
        correlation=2,
        radial_mlp=(16,),
        mlp_irreps="8x0e",
        dtype="float32",
    )


@pytest.fixture(scope="module")
def batch():
    # the student's graph uses a smaller cutoff than the teacher's: the teacher must rebuild its neighbours
    return AtomsDataset(read_structures(SAMPLE / "broad.extxyz")[:6], r_max=3.0).batch()


def test_mace_encoder_protocol_and_own_cutoff(teacher_model, batch):
    enc = MACEEncoder(teacher_model, layers=(1, -1))  # interactions 1 and 2 (0 would be the node embedding)
    assert isinstance(enc, Encoder) and enc.dim == 16 and enc.num_layers == 2 and enc.invariant
    ts = enc.encode(batch)
    assert ts.x.shape == (batch.numbers.numel(), 16) and ts.num_items == 6
    from molecular.data import regraph

    _, ref = teacher_model.forward_intermediates(regraph(batch, 4.5), [1, 2], training=False)
    torch.testing.assert_close(ts.x, torch.cat([t.x.detach() for t in ref], -1))
    _, (short,) = teacher_model.forward_intermediates(batch, [2], training=False)
    assert not torch.allclose(short.x, ref[1].x)  # the 3 Å graph would have given other features
    # the intermediates contract at any layer, through the FrozenEncoder a TeacherTarget uses
    out, every = enc.forward_intermediates(batch, None)
    assert len(every) == 3 and [t.dim for t in every] == [enc.feature_dim(k) for k in range(3)]
    assert out["energy"].shape == (6,)
    frozen = FrozenEncoder(enc)
    torch.testing.assert_close(frozen.encode(batch, layer=1).x, ref[0].x.detach().float())
    assert not MACEEncoder(teacher_model, invariant=False).invariant  # full irreps of interaction 1


def test_teacher_missing_an_element_of_the_data_is_named(teacher_model):
    from molecular.teachers.base import check_teacher_elements

    teacher = FrozenEncoder(MACEEncoder(teacher_model))
    check_teacher_elements(teacher, [1, 6, 8])
    with pytest.raises(ValueError, match=r"does not know element\(s\) S \(Z=16\)"):
        check_teacher_elements(teacher, [1, 6, 16])


def test_project_format_round_trip(tmp_path, teacher_model, batch):
    save_mace_model(teacher_model, tmp_path / "teacher")
    loaded = load_mace_model(tmp_path / "teacher")
    torch.testing.assert_close(MACEEncoder(loaded).encode(batch).x, MACEEncoder(teacher_model).encode(batch).x)
    assert load_mace_model(tmp_path / "teacher", dtype="float64").dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32


def test_pickled_mace_file_needs_trust(tmp_path, teacher_model, batch):
    path = tmp_path / "my_mace.model"
    torch.save(teacher_model.mace, path)  # what mace_run_train / MACE-MP downloads are: a whole pickled model
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        load_mace_model(path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loaded = load_mace_model(path, trust_pickle=True)
    assert any("unpickling" in str(w.message) for w in rec)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ and torch.get_default_dtype() == torch.float32
    assert loaded.z_table == teacher_model.z_table and loaded.r_max == 4.5
    torch.testing.assert_close(MACEEncoder(loaded).encode(batch).x, MACEEncoder(teacher_model).encode(batch).x)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_mace_model(tmp_path / "mace_off23_medium.model")


def test_hook_encoder_matches_direct_features(teacher_model, batch):
    from molecular.data import regraph

    graph = regraph(batch, 4.5)
    # the inner mace.modules model, called with MACE's own input dict: as for any third-party model
    hook = HookEncoder(
        teacher_model.mace,
        "products.0",
        dim=teacher_model.feature_dim(1, "full"),
        prepare=lambda b: ((teacher_model._inputs(regraph(b, 4.5)),), {"compute_force": False}),
    )
    direct = teacher_model.forward_intermediates(graph, [1], features="full", training=False)[1][0].x.detach()
    torch.testing.assert_close(hook.encode(batch).x, direct)
    per = HookEncoder(
        teacher_model.mace,
        "products.0",
        dim=teacher_model.feature_dim(1, "full"),
        per_structure=True,
        prepare=lambda b: ((teacher_model._inputs(regraph(b, 4.5)),), {"compute_force": False}),
    )
    torch.testing.assert_close(per.encode(batch).x, direct)
    with pytest.raises(KeyError, match="no submodule 'products.9'"):
        HookEncoder(teacher_model.mace, "products.9", dim=8, prepare=lambda b: ((), {}))


def test_atoms_function_encoder_and_element_centering(batch):
    def coordination(atoms):  # a toy teacher: [Z, number of neighbours within 1.6 A]
        d = atoms.get_all_distances()
        return torch.stack(
            [
                torch.as_tensor(atoms.numbers, dtype=torch.float32),
                torch.as_tensor((d < 1.6).sum(1) - 1, dtype=torch.float32),
            ],
            1,
        )

    enc = AtomsFunctionEncoder(coordination, dim=2, center=True)
    with pytest.raises(RuntimeError, match="fit_element_means"):
        enc.encode(batch)
    enc.fit_element_means([batch])
    x = enc.encode(batch).x
    for z in batch.numbers.unique():
        torch.testing.assert_close(x[batch.numbers == z].mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_teacher_cache_equals_recomputed(tmp_path, batch):
    """Content-keyed features (item_digests: numbers, positions, cell per structure): precomputed shards of one teacher
    are read by a fresh instance with the same weights, equal the recomputed features, and never serve another."""
    from torch import nn

    from molecular.data import collate_graphs
    from unirep.align import TeacherTarget
    from unirep.features import precompute_features

    teacher = random_mace_teacher([1, 6, 7, 8, 9], seed=3, cache_dir=str(tmp_path))
    digests = teacher.item_digests(batch)
    assert len(set(digests)) == 6 and digests[4] == teacher.item_digests(batch.select([4]))[0]
    holder = nn.Module()
    holder.target = TeacherTarget(encoder=teacher, input_key=None)
    ds = AtomsDataset(read_structures(SAMPLE / "broad.extxyz")[:6], r_max=3.0)
    precompute_features(holder, ds, collate_fn=collate_graphs, batch_size=3, progress=False)
    fresh = random_mace_teacher([1, 6, 7, 8, 9], seed=3, cache_dir=str(tmp_path))  # new process, same weights
    sub = batch.select([4, 1])
    cached = fresh.encode(sub)
    assert fresh.hits == 1 and fresh.misses == 0
    torch.testing.assert_close(cached.x, fresh.encoder.encode(sub).x)  # cached == recomputed
    torch.testing.assert_close(cached.x, teacher.encoder.encode(batch).select([4, 1]).x)
    other = random_mace_teacher([1, 6, 7, 8, 9], seed=4, cache_dir=str(tmp_path))
    assert other.cache_key != fresh.cache_key  # other weights never read stale features
    assert isinstance(teacher, FrozenEncoder)
