"""MaceTask on alignment terms: one forward gives energy, forces and the aligned features; l >= 1 channels towards
an invariant teacher are refused (the invariant contraction is accepted); a teacher missing an element of the data
stops naming it; offline pretrained potentials serve as the teacher at any of their layers; stage two re-weights."""

from functools import partial
from pathlib import Path

import pytest
import torch

from molecular.data import AtomsDataset, read_structures
from molecular.models import MACEModel
from molecular.task import MaceTask, StageTwo
from molecular.teachers import random_mace_teacher
from unirep.align import AlignmentTerm, ProjectorMLP, TeacherTarget

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"


def _student(max_L=1, z_table=(1, 6, 8)):
    torch.manual_seed(0)
    return MACEModel(
        list(z_table),
        r_max=4.0,
        num_channels=8,
        max_L=max_L,
        num_interactions=2,
        max_ell=2,
        correlation=2,
        radial_mlp=(16,),
        mlp_irreps="8x0e",
        dtype="float64",
    )


def _term(layer=1, target_layer=None, encoder=None):
    return AlignmentTerm(
        layer=layer,
        projector=partial(ProjectorMLP, hidden_dim=16),
        target=TeacherTarget(encoder=encoder, layer=target_layer, input_key=None),
        weight=0.5,
    )


@pytest.fixture(scope="module")
def data():
    return AtomsDataset(read_structures(SAMPLE / "md_ethanol.extxyz")[:8], r_max=4.0)


def test_alignment_terms_run_on_the_training_forward(data):
    teacher = random_mace_teacher([1, 6, 7, 8, 9], seed=1)
    task = MaceTask(_student(), align={"repa": _term()}, teacher=teacher, statistics_from=data)
    batch = data.batch()
    out = task(batch, step=0)
    assert {"loss", "loss/repa", "align/repa/cos", "loss/energy", "mae/forces"} <= set(out)
    out["loss"].backward()
    assert task.model.mace.products[0].linear.weight.grad is not None  # the alignment reaches interaction 1
    assert all(p.grad is not None for p in task.alignment.parameters())


def test_equivariant_channels_towards_an_invariant_teacher_are_refused(data):
    teacher = random_mace_teacher([1, 6, 7, 8, 9], seed=1)
    with pytest.raises(ValueError, match=r"l >= 1 \(equivariant\) channels.*align_features=norms"):
        MaceTask(_student(), align={"repa": _term()}, teacher=teacher, align_features="full")
    task = MaceTask(_student(), align={"repa": _term()}, teacher=teacher, align_features="norms")
    assert task.alignment.terms["repa"].projector.in_dim == 16  # 8 scalars + 8 vector norms
    out = task(data.batch(), step=0)
    assert torch.isfinite(out["loss"])


def test_teacher_missing_an_element_of_the_data_stops_naming_it():
    teacher = random_mace_teacher([1, 6, 8], seed=1)  # knows no N
    with pytest.raises(ValueError, match=r"does not know element\(s\) N \(Z=7\)"):
        MaceTask(_student(z_table=(1, 6, 7, 8)), align={"repa": _term()}, teacher=teacher)


def test_ani_teacher_at_any_layer(data):
    pytest.importorskip("torchani")
    from molecular.teachers.external import ANIEncoder
    from unirep.encoders import FrozenEncoder

    ani = FrozenEncoder(ANIEncoder("ANI1x"))
    assert ani.encoder.num_layers == 1 and ani.feature_dim(0) == 384 and ani.feature_dim(-1) == 96
    for target_layer, width in ((None, 96), (0, 384)):
        task = MaceTask(_student(), align={"repa": _term(target_layer=target_layer)}, teacher=ani)
        assert task.alignment.terms["repa"].projector.out_dim == width
        out = task(data.batch(), step=0)
        assert torch.isfinite(out["loss"]) and -1 <= float(out["align/repa/cos"]) <= 1
    assert ani.item_digests(data.batch()) == ani.encoder.item_digests(data.batch())


def test_stage_two_reweights_the_last_part_of_training():
    stage = StageTwo(start=0.75, energy_weight=1000.0, forces_weight=100.0, max_steps=100)
    assert stage.weights(74, 1.0, 100.0) == (1.0, 100.0) and stage.weights(75, 1.0, 100.0) == (1000.0, 100.0)
    task = MaceTask(_student(), stage_two={"enabled": True, "start": 10, "energy_weight": 1000.0})
    assert task.loss_weights(9) == (1.0, 100.0) and task.loss_weights(10) == (1000.0, 100.0)
    assert MaceTask(_student(), stage_two={"enabled": False}).stage_two is None


def test_z_table_comes_from_the_training_split():
    from molecular.data import StructureError
    from molecular.task import TrainingElements

    path = str(SAMPLE / "md_ethanol.extxyz")
    assert TrainingElements(path, n_val=4, r_max=4.0, cache_dir=None) == [1, 6, 8]  # mace_run_train: from the data
    assert TrainingElements(path, n_val=4, include=[9], cache_dir=None) == [1, 6, 8, 9]
    assert TrainingElements(path, elements=[1, 6, 7, 8], cache_dir=None) == [1, 6, 7, 8]
    with pytest.raises(StructureError, match=r"lacks atomic numbers \[8\]"):
        TrainingElements(path, elements=[1, 6], cache_dir=None)
    with pytest.raises(FileNotFoundError, match="task.model.z_table"):
        TrainingElements(str(SAMPLE / "nowhere.extxyz"))
