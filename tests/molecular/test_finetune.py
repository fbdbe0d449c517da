"""Fine-tuning from a foundation MACE: weights load bit for bit (project format and trusted mace files), element
tables are mapped by atomic number or refused by name, another cutoff is refused by name, layers freeze by name."""

from pathlib import Path

import pytest
import torch

from molecular.data import AtomicGraph, collate_graphs, read_structures
from molecular.finetune import FoundationMACE, layer_parameters
from molecular.models import MACEModel
from molecular.teachers import save_mace_model

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"


@pytest.fixture(scope="module")
def foundation():
    torch.manual_seed(7)
    model = MACEModel(
        [1, 6, 7, 8],
        r_max=4.5,
        num_channels=8,
        max_L=1,
        max_ell=2,
        correlation=2,
        radial_mlp=(16,),
        mlp_irreps="8x0e",
        dtype="float64",
    )
    model.set_statistics([-13.6, -1029.8, -1485.3, -2041.0], 1.3, 0.01, 11.0)
    return model


@pytest.fixture(scope="module")
def ethanol_batch():
    s = read_structures(SAMPLE / "md_ethanol.extxyz")[2]
    return collate_graphs([AtomicGraph.from_structure(s, 4.5)])


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_project_format_loads_bit_for_bit_and_maps_the_element_table(tmp_path, foundation, ethanol_batch):
    path = save_mace_model(foundation, tmp_path / "foundation")
    # the data (ethanol: H, C, O) lists its elements in another order and lacks N: mapped by atomic number
    tuned = FoundationMACE(str(path), r_max=4.5, z_table=[8, 1, 6])
    _same_state(tuned, foundation)
    assert tuned.z_table == [1, 6, 7, 8] and float(tuned.avg_num_neighbors) == 11.0
    e_ref = foundation(ethanol_batch, training=False)
    e_new = tuned(ethanol_batch, training=False)
    assert torch.equal(e_new["energy"].detach(), e_ref["energy"].detach())
    torch.testing.assert_close(e_new["forces"], e_ref["forces"], rtol=0, atol=1e-13)  # autograd's sum order
    assert tuned.config["atomic_energies"] == foundation.config["atomic_energies"]
    # what fine-tuning saves is a plain project-format model again
    again = FoundationMACE(str(save_mace_model(tuned, tmp_path / "tuned")))
    _same_state(again, foundation)


def test_trusted_mace_file_loads_bit_for_bit(tmp_path, foundation, ethanol_batch):
    path = tmp_path / "mace_run_train.model"
    torch.save(foundation.mace, path)  # a whole pickled ScaleShiftMACE, as mace_run_train writes it
    with pytest.raises(PermissionError, match="trust_pickle"):
        FoundationMACE(str(path))
    tuned = FoundationMACE(str(path), trust_pickle=True, r_max=4.5)
    _same_state(tuned, foundation)
    assert tuned.config["num_channels"] == 8 and tuned.config["interaction_first"] == "RealAgnosticInteractionBlock"
    torch.testing.assert_close(tuned(ethanol_batch)["forces"], foundation(ethanol_batch)["forces"], rtol=0, atol=1e-13)


def test_unknown_element_and_other_cutoff_are_refused_by_name(tmp_path, foundation):
    path = str(save_mace_model(foundation, tmp_path / "foundation"))
    with pytest.raises(ValueError, match=r"does not know element\(s\) S \(Z=16\)"):
        FoundationMACE(path, z_table=[1, 6, 16])
    with pytest.raises(ValueError, match=r"r_max=4.5 Å but the data's graphs use r_max=5.0 Å"):
        FoundationMACE(path, r_max=5.0)


def test_frozen_layers(tmp_path, foundation):
    path = str(save_mace_model(foundation, tmp_path / "foundation"))
    tuned = FoundationMACE(path, freeze=1)
    parts = layer_parameters(tuned)
    frozen = set(parts["embedding"]) | set(parts["interaction1"])
    assert frozen and set(tuned.frozen) == frozen
    for name, p in tuned.named_parameters():
        assert p.requires_grad == (name not in frozen), name
    assert parts["interaction2"] and parts["readouts"]
    by_name = FoundationMACE(path, freeze=["readouts"])
    assert {n for n, p in by_name.named_parameters() if not p.requires_grad} == set(parts["readouts"])
    with pytest.raises(ValueError, match="unknown part"):
        FoundationMACE(path, freeze=["interaction9"])
