"""Vision recipes: the recipe-specific outputs of 2-step smoke runs, and unirep-sample from the quick start.

tests/unirep/test_configs.py already trains every experiment 2 steps; here the runs are checked for what each
recipe adds (alignment and class-token losses, evaluation JSON, samples), for the recipes with distinct code paths.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from unirep.cli import compose, run_sample, run_train

ROOT = Path(__file__).resolve().parents[2]
MINE = ["sit", "repa", "reg", "haste", "sra", "layersync", "dispersive", "quickstart"]


def _smoke(name, out_dir):
    base = compose("train", [f"experiment=vision/{name}"])
    return compose(
        "train",
        [
            f"experiment=vision/{name}",
            "trainer.max_steps=2",
            f"out_dir={out_dir}",
            "trainer.progress=false",
            *base.smoke,
        ],
    )


def test_configs_exist():
    have = {p.stem for p in (ROOT / "configs" / "experiment" / "vision").glob("*.yaml")}
    assert set(MINE) <= have


@pytest.mark.parametrize("name", ["quickstart", "reg", "sra", "dispersive"])
def test_recipe_trains_two_steps(name, tmp_path):
    cfg = _smoke(name, tmp_path / name)
    assert cfg.task.recipe == ("repa" if name == "quickstart" else name)
    result = run_train(cfg)
    assert result["step"] == 2 and result["bad_steps"] == 0
    ev = result["eval"]
    assert np.isfinite(ev["fd_teacher"]) and 0 <= ev["precision"] <= 1 and 0 <= ev["cond_accuracy"] <= 1
    assert json.loads((tmp_path / name / "eval" / "metrics_step_00000002.json").read_text())["step"] == 2
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    if name in ("repa", "reg", "haste", "sra", "layersync", "quickstart"):
        assert "align/cos" in rows[0]
    if name == "reg":
        assert "loss/cls" in rows[0]
    if name == "quickstart":  # unirep-sample from the EMA weights writes the grid and the arrays
        out = run_sample(compose("sample", [f"checkpoint={tmp_path / name}", "num=10", "+sample.steps=2"]))
        with np.load(out["npz"]) as z:
            assert z["images"].shape == (10, 1, 16, 16)
        assert Path(out["png"]).exists()
