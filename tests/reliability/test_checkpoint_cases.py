"""Cases 30-44 of RELIABILITY_CASES.md: damaged or edited checkpoints, and the trust model of what they may contain.

A checkpoint holds tensors (safetensors, each with its sha256 in ``state.json``) and JSON. Loading never unpickles,
verifies every file it reads, names the folder and the file in every error, and builds from the stored config only
the project's classes and registered factories unless ``trust_config=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle

import pytest
import torch

from tests.reliability.conftest import ckpt, evaluate, sample, train
from unirep.config import UntrustedConfigError
from unirep.train import load_task
from unirep.train.checkpoint import CheckpointError, CheckpointMismatchError


def _state(path):
    return json.loads((path / "state.json").read_text())


def _write_state(path, state):
    (path / "state.json").write_text(json.dumps(state))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_case_30_truncated_model_file(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    _truncate(last / "model.safetensors")
    for load in (lambda: sample(last, tmp_path / "s"), lambda: evaluate(last, tmp_path / "e")):
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(last / "model.safetensors") in str(e.value)
    # resume=auto skips the damaged newest checkpoint for the older one, and says so
    result = train(run_copy, "trainer.resume=auto", "trainer.max_steps=6")
    assert result["step"] == 6
    assert any(p.name.startswith(".damaged-step_00000004") for p in (run_copy / "checkpoints").iterdir())  # kept


def test_case_30b_truncated_model_file_without_checksum(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state.pop("files")  # a checkpoint of the previous format: the reader still names the file
    _write_state(last, state)
    _truncate(last / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_task(last)


@pytest.mark.parametrize("content", ["", "{garbage", "[1, 2]"])
def test_case_31_state_json_garbage(run_copy, tmp_path, content):
    last = ckpt(run_copy, 4)
    (last / "state.json").write_text(content)
    with pytest.raises(CheckpointError) as e:
        sample(last, tmp_path / "s")
    assert str(last / "state.json") in str(e.value)


def test_case_32_config_hidden_changed(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state["config"]["task"]["model"]["hidden"] = 32
    _write_state(last, state)
    with pytest.raises(CheckpointMismatchError) as e:
        sample(last, tmp_path / "s")
    msg = str(e.value)
    assert "model.safetensors" in msg and "[16" in msg and "[32" in msg and "config's model differs" in msg


def test_case_33_config_depth_changed(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state["config"]["task"]["model"]["depth"] = 4
    _write_state(last, state)
    with pytest.raises(KeyError, match="does not match the model: missing"):
        sample(last, tmp_path / "s")


def test_case_34_state_json_without_config(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state.pop("config")
    _write_state(last, state)
    with pytest.raises(KeyError, match="has no config.task"):
        sample(last, tmp_path / "s")


def test_case_35_no_ema_weights(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    (last / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pass ema=false"):  # never silently the raw weights
        sample(last, tmp_path / "s")
    sample(last, tmp_path / "s", "ema=false")
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["weights"] == "raw"  # recorded
    evaluate(last, tmp_path / "e", "ema=false")
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["weights"] == "raw"
    # resume refuses too, unless the EMA is restarted on purpose
    state = _state(last)
    state["files"].pop("ema.safetensors")
    _write_state(last, state)
    with pytest.raises(CheckpointError, match="trainer.reset_ema=true"):
        train(run_copy, "trainer.resume=auto", "trainer.max_steps=6")
    assert train(run_copy, "trainer.resume=auto", "trainer.max_steps=6", "trainer.reset_ema=true")["step"] == 6


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_case_36_missing_model_or_optimizer(run_copy, name):
    last = ckpt(run_copy, 4)
    (last / name).unlink()
    with pytest.raises((FileNotFoundError, CheckpointError)) as e:
        train(run_copy, f"trainer.resume={last}", "trainer.max_steps=6")
    assert str(last / name) in str(e.value)


def test_case_37_truncated_rng(run_copy):
    last = ckpt(run_copy, 4)
    _truncate(last / "rng.safetensors")
    with pytest.raises(CheckpointError) as e:
        train(run_copy, f"trainer.resume={last}", "trainer.max_steps=6")
    assert str(last / "rng.safetensors") in str(e.value)


def test_case_38_step_not_a_number(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state["step"] = "fifty"
    _write_state(last, state)
    with pytest.raises(CheckpointError, match="'step' is 'fifty'") as e:
        sample(last, tmp_path / "s")
    assert str(last / "state.json") in str(e.value)


def test_case_39_flipped_bytes_are_detected(run_copy, tmp_path, capsys):
    last = ckpt(run_copy, 4)
    data = bytearray((last / "model.safetensors").read_bytes())
    for i in range(len(data) - 100, len(data)):  # 100 bytes inside the tensor data: the header still parses
        data[i] ^= 0xFF
    (last / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        sample(last, tmp_path / "s")
    result = train(run_copy, "trainer.resume=auto", "trainer.max_steps=6")  # never trains on the damaged weights
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "falling back to" in out and "step_00000002" in out
    assert result["step"] == 6


@pytest.mark.parametrize(
    "target",
    [
        "molecular.data.write_extxyz",  # a project function that writes a file named in the JSON
        "unirep.cli.os.system",  # reached through a project module
        "unirep.train.checkpoint.shutil.rmtree",
        "os.system",
        "unirep.cli.Path",  # a class imported into a project module from elsewhere
    ],
)
def test_case_40_stored_target_runs_nothing(run_copy, tmp_path, target):
    last = ckpt(run_copy, 4)
    victim = tmp_path / "written_by_the_checkpoint.extxyz"
    state = _state(last)
    state["config"]["task"] = {"_target_": target, "structures": [], "path": str(victim)}
    _write_state(last, state)
    with pytest.raises(UntrustedConfigError) as e:
        sample(last, tmp_path / "s")
    assert target in str(e.value) and "trust_config=true" in str(e.value)
    with pytest.raises(UntrustedConfigError):
        evaluate(last, tmp_path / "e")
    assert not victim.exists()


def test_case_40b_data_config_and_interpolations_are_checked(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state["config"]["data"] = {"_target_": "molecular.data.write_extxyz", "structures": [], "path": "x.extxyz"}
    _write_state(last, state)
    with pytest.raises(UntrustedConfigError, match="data._target_"):
        evaluate(last, tmp_path / "e")
    state["config"]["task"]["num_eval"] = "${oc.env:HOME}"
    _write_state(last, state)
    with pytest.raises(UntrustedConfigError, match="interpolation"):
        sample(last, tmp_path / "s")


def test_case_40c_trust_config_allows_a_users_own_class(run_copy, tmp_path):
    last = ckpt(run_copy, 4)
    state = _state(last)
    state["config"]["task"]["_target_"] = "tests.reliability.user_task.UserToyTask"
    _write_state(last, state)
    with pytest.raises(UntrustedConfigError, match="outside the allowed packages"):
        sample(last, tmp_path / "s")
    sample(last, tmp_path / "s", "trust_config=true")
    assert (tmp_path / "s" / "sample.json").is_file()


def test_case_40d_mace_teacher_path_goes_through_the_trust_model(run_copy, tmp_path):
    from molecular.teachers import load_mace_model

    last = ckpt(run_copy, 4)
    victim = tmp_path / "victim.extxyz"
    state = _state(last)
    state["config"]["task"] = {"_target_": "molecular.data.write_extxyz", "structures": [], "path": str(victim)}
    _write_state(last, state)
    with pytest.raises(UntrustedConfigError):
        load_mace_model(last)
    with pytest.raises(UntrustedConfigError):
        load_mace_model(run_copy)  # a run folder: its newest checkpoint
    assert not victim.exists()


def test_case_41_newest_corrupt_older_intact(run_copy, capsys):
    _truncate(ckpt(run_copy, 4) / "optimizer.safetensors")
    result = train(run_copy, "trainer.resume=auto", "trainer.max_steps=6")
    out = capsys.readouterr().out
    assert "falling back to" in out and "resumed from" in out and "step_00000002 at step 2" in out
    assert result["step"] == 6


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def evil_model(tmp_path):
    path, marker = tmp_path / "evil.model", tmp_path / "a_file"
    with open(path, "wb") as f:
        pickle.dump(_Touch(marker), f)
    return path, marker


def test_case_42_pickle_teacher_refused(evil_model):
    from molecular.teachers import mace_teacher

    path, marker = evil_model
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        mace_teacher(str(path))
    assert not marker.exists()


def test_case_43_pickle_with_consent_runs(evil_model):
    from molecular.teachers import load_mace_model

    path, marker = evil_model
    with pytest.warns(UserWarning), contextlib.suppress(Exception):  # consent given: it runs (and is no MACE model)
        load_mace_model(path, trust_pickle=True)
    assert marker.exists()


def test_case_44_pickle_refused_everywhere(evil_model):
    from molecular.calculator import MACECalculator
    from molecular.teachers import load_mace_model

    path, marker = evil_model
    with pytest.raises(PermissionError):
        load_mace_model(path)
    with pytest.raises(PermissionError):
        MACECalculator.from_model(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_case_40e_every_recipe_target_is_buildable_from_a_checkpoint():
    """The trust model must not refuse the project's own recipes: every ``_target_`` under configs/ is a class of the
    allowed packages or a registered factory. A new factory function fails here until it is added to
    ``unirep.config.FACTORIES``."""
    import re
    from pathlib import Path

    from unirep.cli import config_dir
    from unirep.config import check_targets

    refused = []
    for path in sorted(Path(config_dir()).rglob("*.yaml")):
        for target in sorted(set(re.findall(r"_target_[:=]\s*([A-Za-z_][\w.]*)", path.read_text()))):
            try:
                check_targets({"_target_": target}, "x", str(path))
            except UntrustedConfigError as err:
                if "cannot be imported" not in str(err):  # a target of a backend this machine lacks is not ours
                    refused.append(f"{path.name}: {target}")
    assert not refused, refused
