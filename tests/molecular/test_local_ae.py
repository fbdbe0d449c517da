"""Local autoencoder: invariance and strict locality of the encoder (float64), Kabsch, round trip, errors."""

import numpy as np
import pytest
import torch
from scipy.stats import special_ortho_group

from molecular.conformers import ConformerDataset, collate_molecules, make_record, peptide_smiles
from molecular.tokenizers import kabsch_align, local_ae_small, local_ae_tiny, real_spherical_harmonics


@pytest.fixture(scope="module")
def batch():
    ds = ConformerDataset.from_smiles(["C[C@H](N)C(=O)O", "CC(=O)N", peptide_smiles("GA")], num_confs=2, max_confs=1)
    return collate_molecules([ds[i] for i in range(len(ds))])


def _encode(ae, batch, pos):
    g = batch.radius_graph(ae.r_max, pos)
    return ae.encoder(g.numbers, pos.double(), g.edge_index, g.shifts)


def test_spherical_harmonics_blocks_rotate_orthogonally():
    u = torch.nn.functional.normalize(torch.randn(200, 3, dtype=torch.float64), dim=-1)
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=0))
    y, yr = real_spherical_harmonics(u), real_spherical_harmonics(u @ R.T)
    for sl in (slice(0, 1), slice(1, 4), slice(4, 9)):
        # the block of the rotated vectors is a linear map D of the block, and D is orthogonal
        D = torch.linalg.lstsq(y[:, sl], yr[:, sl]).solution
        torch.testing.assert_close(y[:, sl] @ D, yr[:, sl], atol=1e-10, rtol=0)
        torch.testing.assert_close(D.T @ D, torch.eye(D.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    # component normalisation: mean square 1 per component over the sphere (Monte Carlo)
    big = torch.nn.functional.normalize(torch.randn(200000, 3, dtype=torch.float64), dim=-1)
    assert torch.allclose(real_spherical_harmonics(big).pow(2).mean(0), torch.ones(9, dtype=torch.float64), atol=0.03)


def test_encoder_invariant_permutation_equivariant_and_chiral(batch):
    torch.manual_seed(0)
    ae = local_ae_small().double()
    pos = batch.positions.double()
    z = _encode(ae, batch, pos)
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=4))
    z_rot = _encode(ae, batch, pos @ R.T + torch.tensor([4.0, -1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(z_rot, z, atol=1e-10, rtol=1e-9)
    # a mirror image changes the pseudoscalar channels, hence the latent of atoms near the stereocentre
    z_mirror = _encode(ae, batch, pos * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    assert (z_mirror - z).abs().max() > 1e-6
    # permuting atoms within each structure permutes latents (the radius graph is rebuilt in the new order)
    from dataclasses import replace

    gen = torch.Generator().manual_seed(1)
    perm = torch.cat(
        [
            torch.nonzero(batch.batch == g).squeeze(1)[torch.randperm(int((batch.batch == g).sum()), generator=gen)]
            for g in range(batch.num_graphs)
        ]
    )
    pb = replace(
        batch,
        numbers=batch.numbers[perm],
        atom_types=batch.atom_types[perm],
        batch=batch.batch[perm],
        positions=batch.positions[perm],
    )
    torch.testing.assert_close(_encode(ae, pb, pos[perm]), z[perm], atol=1e-10, rtol=1e-9)


def test_encoder_is_strictly_local():
    torch.manual_seed(0)
    ae = local_ae_tiny().double()
    rec = make_record("CCCCCCCCO", num_confs=1, max_confs=1)
    b = collate_molecules([(rec, rec.conformers[0], 0, 0)])
    pos = b.positions.double()
    z = _encode(ae, b, pos)
    # move atom k; every atom farther than r_max from k (before and after the move) keeps its latent exactly
    k = int(torch.cdist(pos, pos)[0].argmax())
    moved = pos.clone()
    moved[k] += torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)
    z2 = _encode(ae, b, moved)
    far = (torch.cdist(pos, pos[k : k + 1])[:, 0] > ae.r_max) & (torch.cdist(moved, moved[k : k + 1])[:, 0] > ae.r_max)
    assert far.any() and (~far).any()
    torch.testing.assert_close(z2[far], z[far], atol=1e-13, rtol=0)  # only summation-order rounding
    assert (z2[~far] - z[~far]).abs().max() > 1e-8


def test_kabsch_recovers_rotation_and_reports_rmsd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    R = torch.from_numpy(special_ortho_group.rvs(3, random_state=7))
    y = x @ R.T + 2.0
    b = torch.zeros(10, dtype=torch.long)
    torch.testing.assert_close(kabsch_align(x, y, b, 1), y, atol=1e-10, rtol=0)
    # a mirror image cannot be superimposed by a proper rotation
    assert (kabsch_align(-x, y, b, 1) - y).abs().max() > 0.1


def test_round_trip_after_training_a_few_steps():
    from molecular.tokenizers.task import LocalAETask

    torch.manual_seed(0)
    rec = make_record("CC(=O)NC", num_confs=1, max_confs=1)
    b = collate_molecules([(rec, rec.conformers[0], 0, 0)])
    task = LocalAETask(local_ae_tiny(latent_dim=8))
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    first = task(b, 0)
    for step in range(200):
        out = task(b, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    task.eval()
    final = task(b, 0)
    assert float(first["ae/rmsd"]) > 0.8
    assert float(final["ae/rmsd"]) < 0.25 and float(final["ae/type_acc"]) == 1.0
    # encode -> decode through the Tokenizer interface (normalised latent) gives the same reconstruction
    task.model.fit_statistics([b])
    z = task.model.encode(b)
    assert z.shape == (rec.num_atoms, 8) and torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    with torch.no_grad():
        dec = task.model.decode(z, b.batch, b.num_graphs)
    aligned = kabsch_align(dec["pos"], b.positions, b.batch, 1)
    assert float(((aligned - b.positions) ** 2).sum(-1).mean().sqrt()) < 0.25


def test_unknown_element_is_named():
    ae = local_ae_tiny(z_table=(1, 6, 8))
    rec = make_record("CN", num_confs=1, max_confs=1)
    b = collate_molecules([(rec, rec.conformers[0], 0, 0)])
    with pytest.raises(ValueError, match=r"atomic number\(s\) \[7\].*z_table"):
        ae.encode(b)
    with pytest.raises(ValueError, match="invalid peptide sequence"):
        peptide_smiles("G1A")
    assert np.isfinite(float(ae.latent_std.sum()))


def test_encodes_protein_residues_from_the_ccd_as_graph_batches():
    from molecular.data import AtomicGraph, ccd_residue, collate_graphs

    torch.manual_seed(0)
    ae = local_ae_tiny()
    residues = [ccd_residue(name) for name in ("ALA", "SER", "CYS")]
    g = collate_graphs([AtomicGraph.from_structure(s, r_max=2.0) for s in residues])  # short cutoff: re-graphed
    z = ae.encode(g)
    assert z.shape == (sum(len(s) for s in residues), 4) and torch.isfinite(z).all()
    out = ae.decode(z, g.batch, g.num_graphs)
    assert out["type_logits"].shape == (z.shape[0], len(ae.z_table))
    # the same residue alone gives the same latents: nothing outside the structure leaks in
    alone = ae.encode(collate_graphs([AtomicGraph.from_structure(residues[1], r_max=6.0)]))
    n0 = len(residues[0])
    torch.testing.assert_close(z[n0 : n0 + len(residues[1])], alone, atol=1e-5, rtol=1e-5)
