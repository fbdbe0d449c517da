"""Cases 12-29 of RELIABILITY_CASES.md: bad atomistic and image input names the file, the item and the fix.

The molecular readers belong to ``molecular.data`` (another engineer refactors it); these tests use only its public
functions (``read_structures``, ``validate_structures``, ``structures_from_smiles``, ``read_sdf``,
``read_biomolecule``). Cases 13 (symbol ``Xx``) and 23 (empty SMILES) were weak and are fixed there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molecular.data import read_biomolecule, read_sdf, read_structures, structures_from_smiles
from molecular.data.structure import Structure, StructureError, validate_structures

WATER = """3
Properties=species:S:1:pos:R:3:forces:R:3 energy=-14.2 pbc="F F F"
O 0.0 0.0 0.0 0.0 0.0 0.1
H 0.96 0.0 0.0 0.1 0.0 0.0
H -0.24 0.93 0.0 0.0 0.1 0.0
"""


def _xyz(tmp_path, text, name="data.extxyz"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _water(**kw) -> Structure:
    s = Structure(np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]), **kw)
    s.source = "water.extxyz:0"
    return s


@pytest.mark.parametrize("kind", ["missing atom lines", "cut mid-line"])
def test_case_12_truncated_extxyz(tmp_path, kind):
    text = WATER * 2
    text = text.replace("H -0.24 0.93 0.0 0.0 0.1 0.0\n", "", 1) if kind == "missing atom lines" else text[:-20]
    path = _xyz(tmp_path, text)
    with pytest.raises(StructureError, match=str(path)):
        read_structures(path)


def test_case_13_unknown_symbol_xx(tmp_path):  # fixed in molecular.data (another engineer's files)
    path = _xyz(tmp_path, WATER.replace("H 0.96", "Xx 0.96"))
    with pytest.raises(StructureError) as e:
        read_structures(path)
    assert "'Xx'" in str(e.value) and str(path) in str(e.value) and "chemical symbol" in str(e.value)


def test_case_14_element_not_in_the_model_table():
    s = _water()
    s.numbers = np.array([92, 1, 1])
    with pytest.raises(StructureError, match=r"element\(s\) \['U'\] are not in the model's"):
        validate_structures([s], z_table=[1, 6, 7, 8])


def test_case_15_nan_position():
    s = _water()
    s.positions[1, 0] = np.nan
    with pytest.raises(StructureError, match="water.extxyz:0 .*NaN or infinite coordinates"):
        validate_structures([s])


@pytest.mark.parametrize("label", ["forces", "energy"])
def test_case_16_non_finite_labels(label):
    s = _water(energy=np.nan if label == "energy" else -1.0, forces=np.zeros((3, 3)))
    if label == "forces":
        s.forces[0, 0] = np.inf
    with pytest.raises(StructureError, match="NaN/inf in the energy or forces labels"):
        validate_structures([s], require_labels=True)


def test_case_17_overlapping_atoms():
    s = _water()
    s.positions[1] = s.positions[0]
    with pytest.raises(StructureError, match="atoms 0 and 1 overlap"):
        validate_structures([s])


def _read_validated(tmp_path, kind):
    path = tmp_path / "data.extxyz"
    if kind == "empty":
        path.write_text("")
    elif kind == "unlabelled":
        path.write_text(WATER.replace(":forces:R:3 energy=-14.2", "").replace(" 0.0 0.0 0.1\n", "\n"))
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(StructureError) as e:
        validate_structures(read_structures(path), require_labels=True, name=str(path))
    assert str(path) in str(e.value) or "data.extxyz" in str(e.value)


def test_case_18_empty_file(tmp_path):
    _read_validated(tmp_path, "empty")


def test_case_19_missing_file(tmp_path):
    _read_validated(tmp_path, "missing")


def test_case_20_unlabelled_file(tmp_path):
    _read_validated(tmp_path, "unlabelled")


def test_case_21_garbage_file(tmp_path):
    _read_validated(tmp_path, "garbage")


def test_case_22_bad_smiles():
    with pytest.raises(StructureError, match=r"SMILES item 1 \('C1CC\(\('\): rdkit cannot parse it"):
        structures_from_smiles(["CCO", "C1CC(("], optimize=None)


def test_case_23_empty_smiles():  # fixed in molecular.data (another engineer's files)
    with pytest.raises(StructureError, match="SMILES item 1 is empty"):
        structures_from_smiles(["CCO", ""], optimize=None)


def _read_bio(tmp_path, kind):
    path = tmp_path / kind
    atom = "ATOM      1  CA  ALA A   1      11.104   6.134  -6.504  1.00  0.00           {el}\n"
    if kind == "malformed.pdb":
        path.write_text("ATOM      1  CA  ALA A   1      11.1xx   6.134\nEND\n")
    elif kind == "empty.pdb":
        path.write_text("")
    elif kind == "bad.cif":
        path.write_text("data_x\nloop_\n_atom_site.id\n_atom_site.Cartn_x\n1\n")
    else:
        path.write_text(atom.format(el="Q") + "END\n")
    with pytest.raises(StructureError) as e:
        read_biomolecule(path)
    assert str(path) in str(e.value) or path.name in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("kind", ["malformed.pdb", "empty.pdb", "bad.cif"])
def test_case_24_malformed_or_empty_pdb_bad_mmcif(tmp_path, kind):
    _read_bio(tmp_path, kind)


def test_case_25_unknown_element_q(tmp_path):
    assert "'Q'" in _read_bio(tmp_path, "element_q.pdb")


def test_case_26_bad_sdf(tmp_path):
    path = tmp_path / "bad.sdf"
    path.write_text("garbage\n\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\nnot an atom line\n$$$$\n")
    with pytest.raises(StructureError, match="bad.sdf"):
        read_sdf(path)


# ---- images --------------------------------------------------------------------------------------------------------


def _png(path, value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_case_27_corrupt_png_reported_when_the_folder_is_built(tmp_path, damage):
    from vision.data import image_folder_data

    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", 40 * i)
    bad = tmp_path / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40] if damage == "truncated" else b"not a png at all" * 8)
    with pytest.raises(ValueError) as e:  # at build time, before any step: nothing to lose
        image_folder_data(str(tmp_path), resolution=8)
    assert str(bad) in str(e.value) and "Remove or replace" in str(e.value)


def test_case_28_empty_class_folder(tmp_path):
    from vision.data import ImageFolder

    for c in ("a", "c"):
        _png(tmp_path / c / "0.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError) as e:
        ImageFolder(tmp_path, resolution=8)
    assert "['b']" in str(e.value) and "shifts the later classes" in str(e.value)
    (tmp_path / "b").rmdir()
    assert ImageFolder(tmp_path, resolution=8).classes == ["a", "c"]


def test_case_29_labels_out_of_range():
    from vision.models.sit import check_labels

    with pytest.raises(ValueError, match=r"label 2 \(item 'c/4.png:flip'\) is outside \[0, 2\)"):
        check_labels(torch.tensor([0, 2]), 2, ids=["a/0.png", "c/4.png:flip"])
