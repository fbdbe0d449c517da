"""Every experiment config composes and trains 2 steps on CPU; schemas reject misspelt keys by name.

Recipes are found by globbing ``configs/experiment/**/*.yaml``, so a backend's new recipe is tested as soon as it
exists (one test id per file). Each run applies ``debug=smoke`` (configs/debug/smoke.yaml), the recipe's own ``smoke``
model deltas and a temporary ``out_dir`` (lightning-hydra-template's ``tests/test_configs.py`` habit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from unirep.cli import compose, config_dir, run_eval, run_sample, run_train

EXPERIMENTS = sorted((config_dir() / "experiment").rglob("*.yaml"))
NAMES = [str(p.relative_to(config_dir() / "experiment").with_suffix("")) for p in EXPERIMENTS]
# cheap, deterministic trainer settings for every smoke run (configs/debug/smoke.yaml: two steps on one CPU thread;
# extra threads only add contention for smoke-sized models, 30 s vs 2 s per recipe); a recipe's smoke list may
# override them
BASE = ["debug=smoke"]


def _smoke_overrides(name: str, out_dir: Path) -> list[str]:
    cfg = compose("train", [f"experiment={name}"])
    smoke = list(cfg.get("smoke") or [])
    return [f"experiment={name}", *BASE, f"out_dir={out_dir}", *smoke, "trainer.max_steps=2", f"out_dir={out_dir}"]


def test_experiments_found():
    assert "toy" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_experiment_composes_and_trains_two_steps(name, tmp_path):
    cfg = compose("train", _smoke_overrides(name, tmp_path))
    assert cfg.trainer.max_steps == 2 and Path(cfg.out_dir) == tmp_path
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    result = run_train(cfg)
    assert result["step"] == 2
    ckpt = result["checkpoint"]
    assert ckpt is not None and (ckpt / "state.json").is_file()
    saved = json.loads((ckpt / "state.json").read_text())["config"]
    assert saved["name"] == cfg.name and saved["trainer"]["max_steps"] == 2
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "loss.png").is_file()


def test_misspelt_trainer_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["experiment=toy", "trainer.max_stepz=3"])
    assert "max_stepz" in str(err.value) + str(err.value.__cause__)


def test_misspelt_top_level_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["experiment=toy", "sead=3"])
    assert "sead" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("body", ["trainer:\n  bach_size: 8\n", "sead: 3\n"], ids=["trainer", "top"])
def test_misspelt_key_in_experiment_file_fails_with_its_name(body, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs, ignore=shutil.ignore_patterns("molecular", "vision"))
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\nname: typo\n" + body)
    monkeypatch.setenv("UNIREP_CONFIG_DIR", str(configs))
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["experiment=typo"])
    key = body.split(":")[0] if body.startswith("sead") else "bach_size"
    assert key in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", ["experiment=toy", "trainer.batch_size=lots"])
    assert "batch_size" in str(err.value) + str(err.value.__cause__)


def test_sample_and_eval_from_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(compose("train", _smoke_overrides("toy", run)))
    result = run_sample(compose("sample", [f"checkpoint={run}", "num=16", "seed=3", "device=cpu", "+sample.steps=4"]))
    assert result["num"] == 16
    lines = (run / "samples" / "samples.csv").read_text().splitlines()
    assert lines[0] == "x,y" and len(lines) == 17
    assert json.loads((run / "samples" / "sample.json").read_text())["seed"] == 3
    metrics = run_eval(compose("eval", [f"checkpoint={run}/checkpoints", "device=cpu", f"out_dir={tmp_path / 'ev'}"]))
    assert {"mmd", "mmd_prior"} <= set(metrics)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["step"] == 2 and saved["mmd"] == metrics["mmd"]


def test_console_entry_point_trains(tmp_path):
    """The hydra app itself (what `unirep-train` runs): run dir = out_dir, no chdir, resolved config saved."""
    out = tmp_path / "cli"
    smoke = compose("train", ["experiment=toy"]).smoke
    cmd = [sys.executable, "-m", "unirep.cli", "experiment=toy", *BASE, *smoke, f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "final evaluation: mmd=" in proc.stdout
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file() and (out / "train.log").is_file()
