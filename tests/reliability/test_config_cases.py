"""Cases 1-11 of RELIABILITY_CASES.md: command-line and config mistakes stop at start-up with the key named."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.reliability.conftest import toy_cfg, train
from unirep.cli import compose, config_dir


def _fails_naming(exc_info, *words):
    text = str(exc_info.value) + str(getattr(exc_info.value, "__cause__", "") or "")
    for w in words:
        assert w in text, (w, text)


def test_case_01_misspelt_top_level_key(tmp_path, monkeypatch):
    with pytest.raises(Exception) as e:
        toy_cfg(tmp_path, "nmae=foo")
    _fails_naming(e, "nmae")
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\nnmae: foo\n")
    monkeypatch.setenv("UNIREP_CONFIG_DIR", str(configs))
    with pytest.raises(Exception) as e:
        compose("train", ["experiment=typo"])
    _fails_naming(e, "nmae")


def test_case_02_misspelt_trainer_key(tmp_path):
    with pytest.raises(Exception) as e:
        toy_cfg(tmp_path, "trainer.max_step=5")
    _fails_naming(e, "max_step")
    with pytest.raises(Exception) as e:  # '+' slips past the schema: the Trainer names it
        train(tmp_path / "run", "+trainer.max_step=5")
    _fails_naming(e, "max_step")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_case_03_misspelt_task_key(tmp_path):
    with pytest.raises(Exception) as e:
        toy_cfg(tmp_path, "task.sampel_steps=2")
    _fails_naming(e, "sampel_steps")
    with pytest.raises(Exception) as e:
        train(tmp_path / "run", "+task.sampel_steps=2")
    _fails_naming(e, "sampel_steps")


@pytest.mark.parametrize("override", ["trainer.max_steps=abc", "trainer.batch_size=1.5", "seed=x"])
def test_case_04_wrong_type_schema_key(tmp_path, override):
    with pytest.raises(Exception) as e:
        toy_cfg(tmp_path, override)
    _fails_naming(e, override.split("=")[0].split(".")[-1])


@pytest.mark.parametrize(
    "override, expected",
    [("task.sample_steps=abc", "int"), ("data.num_train=abc", "int"), ("optimizer.lr=fast", "float")],
)
def test_case_05_wrong_type_free_form_key(tmp_path, override, expected):
    with pytest.raises(TypeError) as e:
        train(tmp_path / "run", override)
    key, value = override.split("=")
    _fails_naming(e, f"{key}='{value}'", expected)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped at start-up, not in the final evaluation


def test_case_06_experiment_that_does_not_exist(tmp_path):
    with pytest.raises(Exception) as e:
        compose("train", ["experiment=toyy"])
    _fails_naming(e, "toyy", "toy")  # names it and lists the options


def test_case_07_misspelt_schedule_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError) as e:
        train(tmp_path / "run", "trainer.lr_schedule=cosin", "trainer.warmup_steps=100")
    _fails_naming(e, "lr_schedule='cosin'", "cosine")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match="min_lr_ratio"):
        train(tmp_path / "run", "trainer.min_lr_ratio=1e12")


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.precision=bf32", ["precision", "bf32"]),
        ("trainer.batch_size=0", ["batch_size"]),
        ("trainer.batch_size=30", ["batch_size"]),  # fine alone; with accum_steps=4 not a multiple
        ("optimizer._target_=torch.optim.Adamm", ["Adamm"]),
    ],
)
def test_case_08_bad_trainer_and_optimizer_values(tmp_path, override, words):
    extra = ["trainer.accum_steps=4"] if override == "trainer.batch_size=30" else []
    with pytest.raises(Exception) as e:
        train(tmp_path / "run", override, *extra)
    _fails_naming(e, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_case_09_cuda_requested_without_cuda(tmp_path, toy_run):
    with pytest.raises(ValueError) as e:
        train(tmp_path / "run", "trainer.device=cuda")
    _fails_naming(e, "trainer.device=cuda", "CUDA is not available", "trainer.device=cpu")
    from tests.reliability.conftest import sample

    with pytest.raises(ValueError, match="CUDA is not available"):
        sample(toy_run, tmp_path / "s", "device=cuda")


def test_case_10_bad_resume_value(tmp_path):
    for value in ("atuo", str(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError) as e:
            train(tmp_path / "run", f"trainer.resume={value}")
        _fails_naming(e, "trainer.resume", "auto or none")


def test_case_11_unknown_top_level_key_added_with_plus(tmp_path):
    with pytest.raises(KeyError) as e:
        train(tmp_path / "run", "+nmae=foo")
    _fails_naming(e, "nmae", "TrainConfig")
