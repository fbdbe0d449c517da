"""Proteins in: reading keeps every atom with its residue and chain, the reading options, named errors, residue
pooling and the atom37 layout, frames and torsions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molecular.data import StructureError
from molecular.proteins import (
    ATOM37,
    ReadOptions,
    backbone_torsions,
    build_peptide,
    ca_frames,
    collate_proteins,
    kabsch_rmsd,
    pool_residues,
    read_protein,
    residue_frames,
    to_atom37,
    write_cif,
    write_pdb,
)
from molecular.proteins.constants import ATOM37_INDEX, RESIDUE_ATOMS

# a two-chain PDB with an alternate location, a ligand, a water and a hydrogen (written by hand, columns exact)
_PDB = """\
ATOM      1  N   GLY A   1       0.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA  GLY A   1       1.458   0.000   0.000  1.00  0.00           C
ATOM      3  C   GLY A   1       2.009   1.420   0.000  1.00  0.00           C
ATOM      4  O   GLY A   1       1.251   2.390   0.000  1.00  0.00           O
ATOM      5  H   GLY A   1      -0.500  -0.800   0.000  1.00  0.00           H
ATOM      6  N   SER A   2       3.332   1.536   0.000  1.00  0.00           N
ATOM      7  CA  SER A   2       3.970   2.846   0.000  1.00  0.00           C
ATOM      8  C   SER A   2       5.486   2.705   0.000  1.00  0.00           C
ATOM      9  O   SER A   2       6.009   1.593   0.000  1.00  0.00           O
ATOM     10  CB  SER A   2       3.500   3.600   1.250  1.00  0.00           C
ATOM     11  OG ASER A   2       3.900   4.950   1.300  0.60  0.00           O
ATOM     12  OG BSER A   2       2.100   3.550   1.400  0.40  0.00           O
TER
ATOM     13  N   ALA B   5      10.000   0.000   0.000  1.00  0.00           N
ATOM     14  CA  ALA B   5      11.458   0.000   0.000  1.00  0.00           C
ATOM     15  C   ALA B   5      12.009   1.420   0.000  1.00  0.00           C
ATOM     16  O   ALA B   5      11.251   2.390   0.000  1.00  0.00           O
ATOM     17  CB  ALA B   5      11.900  -0.800  -1.200  1.00  0.00           C
TER
HETATM   18 ZN    ZN A 101      20.000  20.000  20.000  1.00  0.00          ZN
HETATM   19  O   HOH A 201      25.000  25.000  25.000  1.00  0.00           O
END
"""


@pytest.fixture
def pdb_file(tmp_path):
    path = tmp_path / "two_chains.pdb"
    path.write_text(_PDB)
    return path


def test_reading_keeps_every_atom_with_its_residue_and_chain(pdb_file):
    p = read_protein(pdb_file, hetero="keep", waters="keep")
    assert len(p) == 18  # 19 records, one alternate location resolved
    assert p.num_residues == 5 and list(p.residue_chains) == ["A", "A", "B", "A", "A"]
    assert p.residue_name_list == ["GLY", "SER", "ALA", "ZN", "HOH"]
    assert list(p.residue_numbers) == [1, 2, 5, 101, 201]
    assert (p.residue_index == np.repeat([0, 1, 2, 3, 4], [5, 6, 5, 1, 1])).all()
    assert p.atom_names[10] == "OG" and p.numbers[4] == 1 and p.hetero[-2:].all()
    assert p.id == "two_chains/model1" and str(pdb_file) in p.source


def test_reading_options(pdb_file):
    p = read_protein(pdb_file)  # defaults: highest-occupancy altloc, hydrogens kept, no hetero, no water
    assert p.residue_name_list == ["GLY", "SER", "ALA"] and len(p) == 16
    og = p.positions[p.atom_names == "OG"][0]
    assert np.allclose(og, [3.9, 4.95, 1.3], atol=1e-3)  # occupancy 0.6 wins
    assert len(read_protein(pdb_file, hydrogens="drop")) == 15
    assert read_protein(pdb_file, chains=["B"]).sequence == "A"
    assert read_protein(pdb_file, hetero="keep").residue_name_list[-1] == "ZN"
    with pytest.raises(ValueError, match="altloc"):
        ReadOptions(altloc="best")


def test_missing_atom_names_chain_residue_and_atom(tmp_path):
    bad = "\n".join(line for line in _PDB.splitlines() if " CA  SER" not in line)
    path = tmp_path / "no_ca.pdb"
    path.write_text(bad + "\n")
    with pytest.raises(StructureError, match=r"chain A residue SER 2 is missing atom\(s\) \['CA'\]"):
        read_protein(path)
    kept = read_protein(path, missing="drop")
    assert kept.residue_name_list == ["GLY", "ALA"]
    partial = read_protein(path, missing="keep")
    coords, mask = partial.atom37()
    assert not mask[1, ATOM37_INDEX["CA"]] and mask[1, ATOM37_INDEX["CB"]]
    no_cb = tmp_path / "no_cb.pdb"
    no_cb.write_text("\n".join(line for line in _PDB.splitlines() if " CB  ALA" not in line) + "\n")
    assert read_protein(no_cb).sequence == "GSA"  # the backbone is complete
    with pytest.raises(StructureError, match=r"chain B residue ALA 5 is missing atom\(s\) \['CB'\]"):
        read_protein(no_cb, require="heavy")


def test_bad_element_and_bad_file(tmp_path):
    path = tmp_path / "bad_element.pdb"
    line = "O   GLY A   1       1.251   2.390   0.000  1.00  0.00           "
    path.write_text(_PDB.replace(line + "O", line + "Q"))
    with pytest.raises(StructureError, match="chain A residue GLY 1 atom O"):
        read_protein(path)
    with pytest.raises(StructureError, match="file not found"):
        read_protein(tmp_path / "absent.pdb")
    junk = tmp_path / "junk.cif"
    junk.write_text("this is not a cif file\n")
    with pytest.raises(StructureError, match="junk.cif"):
        read_protein(junk)


def test_pdb_cif_bcif_round_trip(tmp_path):
    p = build_peptide("ACDG", phi=-63, psi=-42)
    write_pdb(p, tmp_path / "p.pdb")
    write_cif(p, tmp_path / "p.cif")
    write_cif(p, tmp_path / "p.bcif", binary=True)
    for name in ("p.pdb", "p.cif", "p.bcif"):
        q = read_protein(tmp_path / name)
        assert q.sequence == "ACDG" and np.abs(q.positions - p.positions).max() < 1e-3
        assert (q.atom_names == p.atom_names).all()


def test_peptide_torsions_and_atom37():
    phi, psi = [-60.0, -70.0, -120.0, -80.0, -63.0], [-45.0, 140.0, 130.0, -40.0, -42.0]
    p = build_peptide("AKWSG", phi=phi, psi=psi)
    coords, mask = p.atom37()
    assert coords.shape == (5, 37, 3)
    for k, res in enumerate(("ALA", "LYS", "TRP", "SER", "GLY")):
        assert set(np.array(ATOM37)[mask[k]]) == set(RESIDUE_ATOMS[res])
    b = collate_proteins([p])
    x37, m37 = to_atom37(b.positions, b)
    assert torch.equal(m37, torch.as_tensor(mask))
    tor, ok = backbone_torsions(x37, m37, b.residue_chain)
    assert not ok[0, 0] and not ok[-1, 1] and ok[1:, 0].all() and ok[:-1, 1].all()
    assert np.allclose(np.degrees(tor[1:, 0].numpy()), phi[1:], atol=0.5)
    assert np.allclose(np.degrees(tor[:-1, 1].numpy()), psi[:-1], atol=0.5)


def test_pool_residues_and_residue_tokens():
    a, b = build_peptide("GAS"), build_peptide("VL")
    batch = collate_proteins([a, b], r_max=4.0)
    assert batch.num_residues == 5 and batch.residue_batch.tolist() == [0, 0, 0, 1, 1]
    x = torch.arange(len(batch.numbers), dtype=torch.float64)[:, None].repeat(1, 2)
    pooled = pool_residues(batch.tokens(x), batch)
    assert pooled.num_items == 2 and pooled.x.shape == (5, 2)
    first = batch.atom_residue == 0
    assert torch.allclose(pooled.x[0], x[first].mean(0))
    ca = pool_residues(batch.tokens(x), batch, reduce="ca")
    assert torch.equal(ca.x[:, 0], batch.ca_atom.double())
    assert torch.allclose(ca.pos, batch.positions[batch.ca_atom])
    dense, mask = pooled.to_dense()
    assert dense.shape == (2, 3, 2) and mask.sum() == 5


def test_frames_rotate_with_the_structure():
    torch.manual_seed(0)
    p = build_peptide("GASVLK", phi=-63, psi=-42)
    b = collate_proteins([p])
    x37, mask = to_atom37(b.positions, b)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))  # a proper rotation
    shift = torch.randn(3, dtype=torch.float64)
    rot, origin = residue_frames(x37[:, 0], x37[:, 1], x37[:, 2])
    rot2, origin2 = residue_frames(x37[:, 0] @ q.T + shift, x37[:, 1] @ q.T + shift, x37[:, 2] @ q.T + shift)
    assert torch.allclose(rot2, q @ rot, atol=1e-10) and torch.allclose(origin2, origin @ q.T + shift, atol=1e-10)
    ca = b.ca_positions()
    f1, f2 = ca_frames(ca, b.residue_chain), ca_frames(ca @ q.T + shift, b.residue_chain)
    assert torch.allclose(f2, q @ f1, atol=1e-10)
    assert torch.allclose(f1.transpose(1, 2) @ f1, torch.eye(3, dtype=torch.float64).expand(6, 3, 3), atol=1e-10)
    assert float(kabsch_rmsd(ca @ q.T + shift, ca)) < 1e-8
    assert math.isclose(float(kabsch_rmsd(ca + 0.0, ca + torch.tensor([0.5, 0, 0]).double())), 0.0, abs_tol=1e-8)


def test_protein_set_is_split_by_protein_and_reproducible(tmp_path):
    from molecular.proteins.data import ProteinSet, crop_windows, make_protein_set

    m1 = make_protein_set(tmp_path / "a", num_peptides=6, peptide_lengths=(10, 14), mdanalysis=False)
    m2 = make_protein_set(tmp_path / "b", num_peptides=6, peptide_lengths=(10, 14), mdanalysis=False)
    assert [r["sequence"] for r in m1["proteins"]] == [r["sequence"] for r in m2["proteins"]]
    splits = {r["group"]: r["split"] for r in m1["proteins"]}
    assert set(splits.values()) == {"train", "val", "test"}
    train = ProteinSet(tmp_path / "a", "train", r_max=4.0)
    val = ProteinSet(tmp_path / "a", "val")
    assert not {p.id for p in train.items} & {p.id for p in val.items}
    batch = train.collate([train[0], train[1]])
    assert batch.edge_index is not None and batch.num_graphs == 2
    assert torch.equal(train.token_groups(0), torch.as_tensor(train[0].residue_types))
    windows = crop_windows(train[0], 4, min_size=2)
    assert sum(w.num_residues for w in windows) == train[0].num_residues
    assert windows[1].id.endswith("@4") and windows[1].residue_numbers[0] == train[0].residue_numbers[4]
    with pytest.raises(FileNotFoundError, match="make_protein_data.py"):
        ProteinSet(tmp_path / "absent")
