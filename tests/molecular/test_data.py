"""molecular.data: readers, validation errors, neighbour graphs vs brute force and ASE, batching, cache, labels."""

from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.data import (
    AtomicGraph,
    AtomsDataset,
    MMFFCalculator,
    Structure,
    StructureError,
    ccd_residue,
    collate_graphs,
    label_structures,
    load_dataset,
    neighbour_graph,
    read_sdf,
    read_structures,
    split_indices,
    structures_from_smiles,
    thermal_displacements,
    validate_structures,
    write_extxyz,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"


def test_sample_reads_with_labels_and_ids():
    s = read_structures(SAMPLE / "md_ethanol.extxyz")
    assert len(s) >= 40 and all(x.has_labels for x in s)
    assert s[0].id == "ethanol/md0" and len({x.id for x in s}) == len(s)
    assert s[0].forces.shape == (9, 3)
    validate_structures(s, z_table=[1, 6, 8], require_labels=True)


def test_extxyz_round_trip(tmp_path):
    s = read_structures(SAMPLE / "md_ethanol.extxyz")[:3]
    write_extxyz(s, tmp_path / "x.extxyz")
    r = read_structures(tmp_path / "x.extxyz")
    for a, b in zip(s, r, strict=False):
        assert a.id == b.id and a.energy == pytest.approx(b.energy, abs=1e-8)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-7)


def test_bad_inputs_name_file_and_item(tmp_path):
    bad = tmp_path / "broken.extxyz"
    bad.write_text("3\ncomment\nC 0 0 0\nH 1 0\n")
    with pytest.raises(StructureError, match="broken.extxyz"):
        read_structures(bad)
    with pytest.raises(StructureError, match="not found"):
        read_structures(tmp_path / "missing.xyz")
    good = read_structures(SAMPLE / "md_ethanol.extxyz")[:2]
    with pytest.raises(StructureError, match=r"item 0.*element\(s\) \['O'\]"):
        validate_structures(good, z_table=[1, 6])
    nan = Structure([6, 1], [[0, 0, 0], [np.nan, 0, 0]], source="f.xyz:7")
    with pytest.raises(StructureError, match=r"f.xyz:7.*NaN"):
        validate_structures([nan])
    overlap = Structure([6, 1], [[0, 0, 0], [0.1, 0, 0]], source="g.xyz:3")
    with pytest.raises(StructureError, match=r"g.xyz:3.*atoms 0 and 1 overlap"):
        validate_structures([overlap])
    unlabelled = Structure([6, 1], [[0, 0, 0], [1.1, 0, 0]], source="h.xyz:0")
    with pytest.raises(StructureError, match=r"h.xyz:0.*missing label"):
        validate_structures([unlabelled], require_labels=True)
    with pytest.raises(StructureError, match="no structures"):
        validate_structures([], name="train.extxyz")
    with pytest.raises(StructureError, match="duplicate id"):
        validate_structures([good[0], good[0]])
    with pytest.raises(StructureError, match=r"SMILES item 1 \('C1CC'\)"):
        structures_from_smiles(["CCO", "C1CC"])
    with pytest.raises(StructureError, match="md_x.extxyz: data file not found"):
        load_dataset(tmp_path / "md_x.extxyz", r_max=4.0)


def test_unknown_element_and_empty_smiles_are_named(tmp_path):
    bad = tmp_path / "elements.extxyz"
    frame = "2\nProperties=species:S:1:pos:R:3\nC 0 0 0\nH 1.1 0 0\n"
    bad.write_text(frame + "2\nProperties=species:S:1:pos:R:3\nC 0 0 0\nXx 1.1 0 0\n")
    with pytest.raises(StructureError, match=r"unknown element 'Xx' \(.*elements.extxyz:8/frame 1 atom 1\)") as err:
        read_structures(bad)
    assert "could not be read" not in str(err.value)  # an element problem, not a format problem
    with pytest.raises(StructureError, match=r"SMILES item 1 is empty"):
        structures_from_smiles(["CCO", ""])
    with pytest.raises(StructureError, match=r"SMILES item 0 is empty"):
        structures_from_smiles(["   "])


def _brute_force_edges(pos, r_max):
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.nonzero((d < r_max) & ~np.eye(len(pos), dtype=bool))
    return {(int(a), int(b)) for a, b in zip(i, j, strict=False)}


def test_neighbour_graph_molecule_matches_brute_force():
    s = read_structures(SAMPLE / "broad.extxyz")[5]
    ei, us = neighbour_graph(s.positions, 2.5)
    assert set(map(tuple, ei.T.tolist())) == _brute_force_edges(s.positions, 2.5)
    assert (us == 0).all()


def test_neighbour_graph_periodic_matches_ase():
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    atoms = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    atoms.rattle(0.05, seed=1)
    ei, us = neighbour_graph(atoms.positions, 3.0, np.asarray(atoms.cell), atoms.pbc)
    i, j, S = neighbor_list("ijS", atoms, 3.0)
    mine = sorted(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, us.tolist()), strict=False))
    ref = sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist()), strict=False))
    assert mine == ref
    # edge vectors r_receiver - r_sender + shift all within the cutoff
    vec = atoms.positions[ei[1]] - atoms.positions[ei[0]] + us @ np.asarray(atoms.cell)
    assert np.linalg.norm(vec, axis=1).max() < 3.0


def test_batch_tokens_and_graph_round_trip():
    ds = AtomsDataset(read_structures(SAMPLE / "broad.extxyz")[:5], r_max=4.0, z_table=[1, 6, 7, 8, 9])
    b = ds.batch()
    assert b.num_graphs == 5 and b.ptr[-1] == b.numbers.numel()
    ts = b.tokens(torch.randn(b.numbers.numel(), 4))
    assert ts.num_items == 5 and torch.equal(ts.counts, b.num_atoms)
    # per-graph edges stay inside their graph after the offsets
    assert torch.equal(b.batch[b.edge_index[0]], b.batch[b.edge_index[1]])
    sub = b.select([3, 1])
    g3 = ds[3]
    assert sub.ids == [ds.structures[3].id, ds.structures[1].id]
    assert torch.equal(sub.graph(0).edge_index, g3.edge_index) and torch.equal(sub.graph(0).positions, g3.positions)


def test_molecule_batch_gets_a_radius_graph():
    from molecular.conformers import collate_molecules, make_record

    rec = make_record("CCO", num_confs=1, max_confs=1)
    mb = collate_molecules([(rec, rec.conformers[0], 0, 0), (rec, rec.conformers[0] + 1.0, 0, 0)])
    assert mb.edge_index is None and mb.bond_index is not None and mb.numbers.tolist()[:3] == [6, 6, 8]
    assert mb.num_atoms.tolist() == [9, 9]
    g = mb.radius_graph(3.0)
    s = Structure(mb.numbers[:9].numpy(), rec.conformers[0].double().numpy())
    ref = collate_graphs([AtomicGraph.from_structure(s, 3.0)] * 2)
    assert torch.equal(g.edge_index, ref.edge_index) and g.ids == ["CCO#0", "CCO#0"]
    assert g.positions.dtype == torch.float64 and g.energy is None


def test_cache_round_trip(tmp_path):
    path = SAMPLE / "md_ethanol.extxyz"
    a = load_dataset(path, r_max=4.0, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    b = load_dataset(path, r_max=4.0, cache_dir=tmp_path)
    ba, bb = collate_graphs(a.graphs), collate_graphs(b.graphs)
    for key in ("numbers", "positions", "edge_index", "unit_shifts", "energy", "forces"):
        assert torch.equal(getattr(ba, key), getattr(bb, key)), key
    assert ba.ids == bb.ids
    load_dataset(path, r_max=3.0, cache_dir=tmp_path)  # another cutoff is another cache entry
    assert len(list(tmp_path.iterdir())) == 2


def test_splits_fixed_by_seed_and_disjoint():
    a = split_indices(50, (0.6, 0.2, 0.2), seed=3)
    assert a == split_indices(50, (0.6, 0.2, 0.2), seed=3)
    assert a != split_indices(50, (0.6, 0.2, 0.2), seed=4)
    flat = sum(a, [])
    assert sorted(flat) == list(range(50)) and [len(x) for x in a] == [30, 10, 10]
    with pytest.raises(ValueError, match="ask for"):
        split_indices(5, sizes=[4, 4])


def _fd_forces(atoms, calc, idx, h=1e-4):
    atoms.calc = calc
    out = []
    for c in range(3):
        x = atoms.get_positions()
        x[idx, c] += h
        atoms.set_positions(x)
        ep = atoms.get_potential_energy()
        x[idx, c] -= 2 * h
        atoms.set_positions(x)
        em = atoms.get_potential_energy()
        x[idx, c] += h
        atoms.set_positions(x)
        out.append(-(ep - em) / (2 * h))
    return np.array(out)


@pytest.mark.parametrize("name", ["mmff", "gfn2"])
def test_labels_forces_are_minus_energy_gradient(name):
    s = thermal_displacements(structures_from_smiles(["CCO"], seed=1)[0], 1, sigma=0.03, seed=2)[0]
    lab = label_structures([s], name)[0]
    calc = MMFFCalculator() if name == "mmff" else __import__("molecular.data", fromlist=["x"]).make_calculator(name)
    fd = _fd_forces(s.to_atoms(), calc, 2)
    np.testing.assert_allclose(lab.forces[2], fd, atol=2e-3)
    assert np.isfinite(lab.energy)


def test_sdf_and_ccd_readers(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)O"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    w = Chem.SDWriter(str(tmp_path / "acid.sdf"))
    w.write(mol)
    w.close()
    s = read_sdf(tmp_path / "acid.sdf")
    assert len(s) == 1 and len(s[0]) == 8 and s[0].id == "acid/0/0"
    ala = ccd_residue("ALA")
    assert sorted(set(ala.numbers.tolist())) == [1, 6, 7, 8]
    with pytest.raises(StructureError, match="XYZQ"):
        ccd_residue("XYZQ")


def test_normal_mode_sampling_is_thermal():
    from ase.units import kB

    from molecular.data import normal_mode_samples

    start = structures_from_smiles(["CCO"], seed=0, optimize="mmff")[0]  # an MMFF94 minimum
    temperature, num = 20.0, 40
    samples = normal_mode_samples(start, num, temperature=temperature, calculator="mmff", seed=1)
    e0 = label_structures([start], "mmff")[0].energy
    de = np.array([s.energy - e0 for s in label_structures(samples, "mmff")])
    # harmonic equipartition at low T: each of the 3N-6 modes holds kT/2 of potential energy on average
    expected = (3 * len(start) - 6) * kB * temperature / 2
    assert de.mean() == pytest.approx(expected, rel=0.25)
    assert len({s.id for s in samples}) == num


def test_langevin_md_frames_are_labelled_and_move():
    from molecular.data import langevin_md

    start = structures_from_smiles(["CCO"], seed=0)[0]
    frames = langevin_md(start, 3, calculator="mmff", temperature=300, interval=5, seed=0)
    assert [f.id for f in frames] == ["smiles0/0/md0", "smiles0/0/md1", "smiles0/0/md2"]
    assert all(f.has_labels for f in frames)
    assert np.abs(frames[2].positions - frames[0].positions).max() > 1e-3
