"""Molecular recipes: MACE-REPA's evaluation (errors, alignment floor, parity plot); checkpoint -> ASE calculator
gives the task's own energies and forces."""

from pathlib import Path

import numpy as np
import pytest
import torch

from unirep.cli import compose, run_train

ROOT = Path(__file__).resolve().parents[2]
# the force-field recipes (others: generative models)
RECIPES = [
    "mace",
    "mace_repa",
    "quickstart",
    "foundation",
    "foundation_quick",
    "mace_finetune",
    "mace_finetune_repa",
    "graphnet",
]


def _smoke_cfg(name: str, out_dir: Path, extra: tuple[str, ...] = ()):
    base = compose("train", [f"experiment=molecular/{name}"])
    return compose(
        "train", [f"experiment=molecular/{name}", "trainer.max_steps=2", *base.smoke, f"out_dir={out_dir}", *extra]
    )


def test_recipes_exist():
    for name in RECIPES:
        assert (ROOT / "configs" / "experiment" / "molecular" / f"{name}.yaml").is_file()


def test_mace_repa_smoke_run_reports_errors_and_alignment_floor(tmp_path, monkeypatch):
    # (2-step runs of every recipe are in tests/unirep/test_configs.py; this checks what MACE-REPA evaluates)
    monkeypatch.chdir(ROOT)  # configs name repository-relative data paths
    out = tmp_path / "repa"
    ev = run_train(_smoke_cfg("mace_repa", out))["eval"]
    assert np.isfinite(ev["val/f_mae_meV_A"]) and np.isfinite(ev["val/e_mae_meV"]) and ev["val/loss"] > 0
    for key in ("val_cos", "fit_real", "floor_shuffled", "floor_element_mean"):
        assert -1.0 <= ev[f"align/repa/{key}"] <= 1.0, key
    assert list(out.glob("eval_step*.json")) and list(out.glob("parity_step*.png"))


def test_teachers_are_artifacts_missing_ones_name_their_command(tmp_path):
    from molecular.quickstart import foundation_teacher

    with pytest.raises(FileNotFoundError, match=r"experiment=molecular/foundation task.export=\S*nowhere"):
        foundation_teacher(str(tmp_path / "nowhere"))


def test_mace_repa_config_keys_are_stable():
    """The keys the benchmarks override (docs/molecular.md): composing them must keep working."""
    cfg = compose(
        "train",
        [
            "experiment=molecular/mace_repa",
            "task.align.repa.layer=2",
            "task.align.repa.weight=1.0",
            "task.align.repa.target.layer=-1",
            "task.align_features=norms",
            "task.teacher.path=/tmp/x",
            "task.stage_two.enabled=true",
            "task.model.z_table.elements=[1,6,8]",
        ],
    )
    assert cfg.task.align.repa.layer == 2 and cfg.task.teacher.path == "/tmp/x"
    ani = compose("train", ["experiment=molecular/mace_repa", "teacher@task.teacher=molecular_ani"])
    assert ani.task.teacher._target_ == "unirep.encoders.FrozenEncoder"


def test_checkpoint_to_ase_calculator(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from molecular.calculator import MACECalculator
    from molecular.data import AtomicGraph, collate_graphs, read_structures
    from unirep.train import load_task

    run = tmp_path / "run"
    result = run_train(_smoke_cfg("mace", run))
    task, _ = load_task(result["checkpoint"], ema=True)
    s = read_structures(ROOT / "data" / "molecular_sample" / "md_ethanol.extxyz")[3]
    ref = task.model(collate_graphs([AtomicGraph.from_structure(s, task.model.r_max)]), training=False)
    calc = MACECalculator.from_checkpoint(run)  # the run folder: its newest checkpoint
    atoms = s.to_atoms()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"].detach()), abs=1e-5)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"].detach().double().numpy(), atol=1e-5)
    assert torch.get_default_dtype() == torch.float32
