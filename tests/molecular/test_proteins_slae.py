"""SLAE-style autoencoder: strict locality on proteins, invariance / equivariance in float64, gradients, metrics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from molecular.proteins import build_peptide, collate_proteins
from molecular.proteins.residues import to_atom37
from molecular.proteins.slae import local_atom37, reconstruction_metrics, slae_tiny


def _rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return slae_tiny(latent_dim=4, r_max=4.0).double().eval()


@pytest.fixture(scope="module")
def strand():
    return build_peptide("GASKLEVWTDAGRS", phi=-120, psi=130)  # extended: ~3.3 Å per residue


def test_encoder_is_strictly_local(model, strand):
    batch = collate_proteins([strand])
    z = model.encoder(model.graph(batch), batch.positions)
    r = 3
    own = torch.as_tensor(strand.residue_index == r)
    d = torch.cdist(batch.positions, batch.positions[own]).min(1).values  # distance to the residue's atoms
    far = d > model.r_max
    assert far.sum() > 50
    g = torch.Generator().manual_seed(1)
    moved = batch.positions + 1.5 * torch.randn(batch.positions.shape, generator=g, dtype=torch.float64)
    stays_far = torch.cdist(moved, batch.positions[own]).min(1).values > model.r_max
    far &= stays_far  # move only atoms that are beyond the cutoff of residue r's atoms before and after
    assert far.sum() > 50
    moved = torch.where(far[:, None], moved, batch.positions)
    moved_batch = replace(batch, positions=moved, edge_index=None)
    z2 = model.encoder(model.graph(moved_batch), moved)
    assert torch.allclose(z2[r], z[r], atol=1e-12, rtol=0)
    assert not torch.allclose(z2, z)  # other residues did see the change


def test_encoder_invariant_and_decoder_equivariant_float64(model, strand):
    batch = collate_proteins([strand])
    q, shift = _rotation(2), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    moved = replace(batch, positions=batch.positions @ q.T + shift)
    z1 = model.encoder(model.graph(batch), batch.positions)
    z2 = model.encoder(model.graph(moved), moved.positions)
    assert torch.allclose(z1, z2, atol=1e-10)
    ca = batch.ca_positions()
    out1 = model.decoder(z1, batch, ca)
    out2 = model.decoder(z1, batch, ca @ q.T + shift)
    assert torch.allclose(out2["atom37"], out1["atom37"] @ q.T + shift, atol=1e-10)
    assert torch.allclose(out2["type_logits"], out1["type_logits"]) and torch.allclose(out2["local"], out1["local"])
    x37, _ = to_atom37(batch.positions, batch)
    loc1 = local_atom37(x37, ca, batch.residue_chain)
    loc2 = local_atom37(x37 @ q.T + shift, ca @ q.T + shift, batch.residue_chain)
    assert torch.allclose(loc1, loc2, atol=1e-10)


def test_every_parameter_gets_a_gradient_and_metrics_are_finite(strand):
    torch.manual_seed(0)
    model = slae_tiny(latent_dim=4, r_max=4.0, latent_noise=0.1)
    batch = collate_proteins([strand, build_peptide("MKVLA", phi=-63, psi=-42)])
    total, logs, out = model.losses(batch, noise=True)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing and torch.isfinite(total)
    assert out["atom37"].shape == (19, 37, 3) and out["distogram"].shape == (14 * 13 // 2 + 5 * 4 // 2, 64)
    m = reconstruction_metrics(model.eval(), batch)
    assert {"rmsd_all", "rmsd_backbone", "rmsd_all_given_ca", "type_acc", "chi1_acc_40"} <= set(m)
    assert all(np.isfinite(v) for k, v in m.items() if k != "contact_precision_L")
