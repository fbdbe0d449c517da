"""Local protein environments: capped fragments, residue tokens from an atom encoder, probes, unirep-converge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.proteins import build_peptide, collate_proteins
from molecular.proteins.environments import (
    RandomAtomEncoder,
    ResidueEnvironmentEncoder,
    linear_probes,
    residue_fragment,
    residue_labels,
)


@pytest.fixture(scope="module")
def peptide():
    return build_peptide("GAKWSLE", phi=-63, psi=-42)


def test_fragment_is_capped_and_masks_the_side_chain(peptide):
    r = 3  # TRP
    frag, centre = residue_fragment(peptide, r, cutoff=6.0)
    ca = peptide.positions[peptide.atom_index("CA")[r]]
    assert frag.numbers[centre] == 6 and np.allclose(frag.positions[centre], ca)
    heavy = frag.numbers > 1
    assert (np.linalg.norm(frag.positions[heavy] - ca, axis=1) < 6.0).all()
    caps = frag.positions[~heavy]
    assert len(caps) > 0  # bonds cut at the sphere are capped
    d = np.linalg.norm(caps[:, None] - frag.positions[heavy][None], axis=-1).min(1)
    assert np.allclose(d, 1.09, atol=0.1) | np.allclose(d, 1.01, atol=0.1) or (d < 1.2).all()
    masked, c2 = residue_fragment(peptide, r, cutoff=6.0, mask_side_chain=True)
    own_side = (peptide.residue_index == r) & ~np.isin(peptide.atom_names, ["N", "CA", "C", "O"])
    for pos in peptide.positions[own_side]:
        assert np.linalg.norm(masked.positions - pos, axis=1).min() > 1e-6  # every side-chain atom is gone
    cb_cap = np.linalg.norm(masked.positions[masked.numbers == 1] - ca, axis=1).min()
    assert abs(cb_cap - 1.09) < 1e-6  # CA is capped where CB was: a glycine-like centre


def test_residue_tokens_full_and_fragment(peptide):
    other = build_peptide("VLG", phi=-120, psi=130)
    full = ResidueEnvironmentEncoder(RandomAtomEncoder(r_max=4.0, dim=8))
    ts = full.encode_layers(collate_proteins([peptide, other]))[-1]
    assert ts.x.shape == (10, 8) and ts.num_items == 2 and ts.batch.tolist() == [0] * 7 + [1] * 3
    mean = ResidueEnvironmentEncoder(RandomAtomEncoder(r_max=4.0, dim=8), pool="mean").encode([peptide])
    assert mean.x.shape == (7, 8) and not torch.allclose(mean.x, ts.x[:7])
    frag = ResidueEnvironmentEncoder(RandomAtomEncoder(r_max=4.0, dim=8), mode="fragment", cutoff=6.0, stride=2)
    ft = frag.encode([peptide, other])
    assert ft.x.shape == (4 + 2, 8) and ft.batch.tolist() == [0, 0, 0, 0, 1, 1]
    # a fragment of radius >= the encoder cutoff + the protein's extent gives the full-protein CA token
    whole = ResidueEnvironmentEncoder(RandomAtomEncoder(r_max=4.0, dim=8), mode="fragment", cutoff=60.0)
    assert torch.allclose(whole.encode([peptide]).x, ts.x[:7], atol=1e-5)
    with pytest.raises(ValueError, match="mask_side_chain needs mode='fragment'"):
        ResidueEnvironmentEncoder(RandomAtomEncoder(), mask_side_chain=True)


def test_labels_and_probes():
    labels = residue_labels(build_peptide("GAKWSLEAKLAG", phi=-63, psi=-42))
    assert labels["residue_type"].tolist()[:3] == [7, 0, 11]  # G A K
    assert (labels["sse"][2:-2] == 0).all()  # an ideal helix
    assert not labels["torsion_mask"][0] and labels["torsion_mask"][1:-1].all()
    assert np.allclose(np.degrees(np.arctan2(labels["torsions"][1:-1, 0], labels["torsions"][1:-1, 1])), -63, atol=1)
    rng = np.random.default_rng(0)
    n = 200
    y = {
        "sse": rng.integers(0, 3, n),
        "residue_type": rng.integers(0, 20, n),
        "torsions": rng.standard_normal((n, 4)),
        "torsion_mask": np.ones(n, dtype=bool),
    }
    x = np.concatenate([np.eye(3)[y["sse"]], y["torsions"], rng.standard_normal((n, 3))], 1)
    out = linear_probes(x[:150], {k: v[:150] for k, v in y.items()}, x[150:], {k: v[150:] for k, v in y.items()})
    assert out["sse_acc"] == 1.0 and out["torsion_r2"] > 0.99 and out["residue_type_acc"] < 0.3


def test_protein_converge_config_runs(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from unirep.converge import register_converge_config, run_convergence

    register_converge_config()
    configs = Path(__file__).resolve().parents[2] / "configs" / "converge"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("protein_quick", [f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"])
    assert {m.name for m in cfg.models} >= {"chgnet", "soap", "random"}
    with open_dict(cfg):
        cfg.data = OmegaConf.create({"_target_": "molecular.proteins.data.peptide_set", "num": 6, "lengths": [6, 8]})
        cfg.models = [m for m in cfg.models if m.name == "random"]
        cfg.levels = ["item", "token", "token_centred"]
        cfg.metrics = [{"name": "mutual_knn", "topk": 3}, {"name": "cka", "kernel": "linear"}]
        cfg.progress = False
        cfg.min_group_tokens = 5
    out = run_convergence(cfg)
    assert [f.name for f in out["features"]] == ["random_seed0", "random_seed1"]
    assert out["features"][0].tokens[0].shape[1] == 64 and (tmp_path / "out" / "summary.json").is_file()
