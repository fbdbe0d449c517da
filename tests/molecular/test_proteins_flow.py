"""Partially latent protein flow: equivariance in float64, gradients, samples decoded to atoms, validity, REPA."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from molecular.proteins import build_peptide, collate_proteins, read_protein, to_atom37
from molecular.proteins.environments import RandomAtomEncoder, ResidueEnvironmentEncoder
from molecular.proteins.flow import (
    ProteinFlowTask,
    RamachandranReference,
    ResidueVelocityNet,
    flow_tiny,
    residue_skeleton,
    structure_validity,
)
from molecular.proteins.slae import slae_tiny
from unirep.align import AlignmentTerm, ProjectorMLP, TeacherTarget


def _rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q  # any orthogonal matrix: the velocity network is E(3)-equivariant (reflections included)


@pytest.fixture(scope="module")
def peptides():
    return [build_peptide("GASKLEVW", phi=-63, psi=-42), build_peptide("MKTAYI", phi=-120, psi=130)]


def test_velocity_network_is_equivariant_float64(peptides):
    torch.manual_seed(0)
    net = ResidueVelocityNet(latent_dim=3, hidden=16, num_layers=2, edge_dim=4).double()
    batch = collate_proteins(peptides)
    r = batch.num_residues
    x = torch.randn(r, 3, dtype=torch.float64)
    z = torch.randn(r, 3, dtype=torch.float64)
    t = torch.rand(batch.num_graphs, dtype=torch.float64)[batch.residue_batch]
    q, shift = _rotation(3), torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    (vx, vz), feats = net.forward_intermediates(batch, x, t, z, [0, 1, 2])
    (vx2, vz2), feats2 = net.forward_intermediates(batch, x @ q.T + shift, t, z, [0, 1, 2])
    assert torch.allclose(vx2, vx @ q.T, atol=1e-10) and torch.allclose(vz2, vz, atol=1e-10)
    assert all(torch.allclose(a.x, b.x, atol=1e-10) for a, b in zip(feats, feats2, strict=True))
    assert len(feats) == 3 and feats[1].x.shape == (r, 16) and net.feature_dim(1) == 16


def test_flow_step_trains_the_velocity_network_only(peptides):
    torch.manual_seed(0)
    task = ProteinFlowTask(flow_tiny(4), slae_tiny(latent_dim=4, r_max=4.0), sample_steps=2)
    out = task(collate_proteins(peptides))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and {"loss/ca", "loss/latent"} <= set(out)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.model.parameters())
    assert all(p.grad is None for p in task.autoencoder.parameters())


def test_samples_go_through_the_decoder(tmp_path):
    torch.manual_seed(0)
    task = ProteinFlowTask(flow_tiny(4), slae_tiny(latent_dim=4, r_max=4.0), sample_steps=3)
    gen = task.generate([6, 9], seed=1)
    assert gen["atom37"].shape == (15, 37, 3) and gen["mask"].shape == (15, 37) and gen["types"].shape == (15,)
    assert gen["mask"][:, :3].all()  # every decoded residue has N, CA, C
    ca_slot = 1
    assert torch.allclose(gen["atom37"][:, ca_slot], gen["ca"].to(gen["atom37"]), atol=1e-5)  # atoms on the trace
    out = task.sample(tmp_path, num=2, seed=0, lengths=[5, 7])
    assert out["num"] == 2
    back = read_protein(out["files"][1], missing="keep")
    assert back.num_residues == 7


def test_validity_of_real_and_corrupted_structures():
    pep = build_peptide("GASAAGSAAGAS", phi=-63, psi=-42)  # small side chains: no clashes
    b = collate_proteins([pep])
    x37, m37 = to_atom37(b.positions, b)
    rama = RamachandranReference(np.array([[-63.0, -42.0]] * 50 + [[-120.0, 130.0]] * 50))
    good = structure_validity(x37, m37, b.residue_batch, b.residue_chain, rama)
    assert good["bond_within_0.1"] == 1.0 and good["ca_ca_within_0.2"] == 1.0 and good["rama_allowed"] == 1.0
    assert good["clashes_per_residue"] == 0.0 and good["angle_mae/N-CA-C"] < 3.0
    g = torch.Generator().manual_seed(0)
    noisy = x37 + 0.8 * torch.randn(x37.shape, generator=g, dtype=x37.dtype)
    bad = structure_validity(noisy, m37, b.residue_batch, b.residue_chain, rama)
    assert bad["bond_within_0.1"] < 0.3 and bad["bond_mae/N-CA"] > 0.3
    squashed = structure_validity(x37 * 0.3, m37, b.residue_batch, b.residue_chain, rama)
    assert squashed["clashes_per_residue"] > 1.0
    sk = residue_skeleton([3, 4])
    assert sk.num_graphs == 2 and sk.residue_position.tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_repa_term_on_the_trunk(peptides):
    torch.manual_seed(0)
    teacher = ResidueEnvironmentEncoder(RandomAtomEncoder(r_max=4.0, dim=8))
    term = AlignmentTerm(
        layer=1,
        projector=functools.partial(ProjectorMLP, hidden_dim=16),
        target=TeacherTarget(encoder=None, input_key=None),
        weight=0.5,
    )
    task = ProteinFlowTask(flow_tiny(4), slae_tiny(latent_dim=4, r_max=4.0), align={"repa": term}, teacher=teacher)
    out = task(collate_proteins(peptides))
    out["loss"].backward()
    assert "align/repa/cos" in out and torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in task.alignment.parameters() if p.requires_grad)
