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
            "debug=smoke",
            f"out_dir={out_dir}",
            *base.smoke,
        ],
    )


def test_configs_exist():
    have = {p.stem for p in (ROOT / "configs" / "experiment" / "vision").glob("*.yaml")}
    assert set(MINE) <= have


# each recipe as alignment terms (configs/align/*.yaml): term name -> target kind
TERMS = {
    "sit": {},
    "repa": {"repa": "unirep.align.TeacherTarget"},
    "quickstart": {"repa": "unirep.align.TeacherTarget"},
    "reg": {"repa": "unirep.align.TeacherTarget"},
    "haste": {"repa": "unirep.align.TeacherTarget", "attn": None},
    "sra": {"sra": "unirep.align.EMATarget"},
    "layersync": {"layersync": "unirep.align.LayerTarget"},
    "dispersive": {"dispersive": None},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_recipes_are_defaults_plus_terms(name):
    cfg = compose("train", [f"experiment=vision/{name}"])
    assert "recipe" not in cfg.task and cfg.task._target_ == "vision.task.VisionFlowTask"
    terms = dict(cfg.task.get("align") or {})
    assert {k: (v.target._target_ if v.get("target") else None) for k, v in terms.items()} == TERMS[name]
    assert cfg.data.resolution == 16 and cfg.task.model.hidden_size == 64 and cfg.task.teacher.grid_size == 4
    assert not any(o.startswith("trainer.") for o in cfg.smoke)  # the shared trainer settings live in debug/smoke
    if name == "reg":
        assert cfg.task.align.repa.target.mode == "pooled+tokens" and cfg.task.cls_token.weight == 0.03
    if name == "haste":  # both terms stop at the same step
        assert cfg.task.align.attn.schedule.stop_step == cfg.task.align.repa.schedule.stop_step == 500
    if name == "sra":
        t = cfg.task.align.sra.target
        assert (t.time_offset, t.offset_dist, cfg.task.align.sra.loss.beta) == (0.2, "uniform", 0.05)


@pytest.mark.parametrize("name", ["quickstart", "reg", "haste", "sra", "dispersive"])
def test_recipe_trains_two_steps(name, tmp_path):
    cfg = _smoke(name, tmp_path / name)
    result = run_train(cfg)
    assert result["step"] == 2 and result["bad_steps"] == 0
    ev = result["eval"]
    assert np.isfinite(ev["fd_teacher"]) and 0 <= ev["precision"] <= 1 and 0 <= ev["cond_accuracy"] <= 1
    assert json.loads((tmp_path / name / "eval" / "metrics_step_00000002.json").read_text())["step"] == 2
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    for term in TERMS[name]:
        assert f"loss/{term}" in rows[0]
    if name in ("reg", "quickstart"):
        assert "align/repa/cos" in rows[0]
    if name == "reg":
        assert "loss/cls" in rows[0]
    if name == "quickstart":  # unirep-sample from the EMA weights writes the grid and the arrays
        out = run_sample(compose("sample", [f"checkpoint={tmp_path / name}", "num=10", "+sample.steps=2"]))
        with np.load(out["npz"]) as z:
            assert z["images"].shape == (10, 1, 16, 16)
        assert Path(out["png"]).exists()
