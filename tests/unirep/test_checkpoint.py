"""Checkpoints: round trips, frozen teachers left out, strict loading, atomic writes, keep-last, load_task."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import unirep.train.checkpoint as ckpt
from unirep.encoders import FrozenEncoder
from unirep.tokens import TokenSet
from unirep.train import EMA, Task, find_checkpoint, list_checkpoints, load_checkpoint, load_task, save_checkpoint
from unirep.train.checkpoint import flatten_optimizer_state, unflatten_optimizer_state


class TinyEncoder(nn.Module):
    dim = 4

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def encode(self, sample):
        return TokenSet.from_dense(self.proj(sample))


class TaskWithTeacher(Task):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.head = nn.Linear(4, 4)
        self.teacher = FrozenEncoder(TinyEncoder())

    def forward(self, batch, step):
        return {"loss": self.head(self.model(batch)).square().mean()}


def _rehash(path):
    """Record the sha256 of edited files, as a user who edits a checkpoint on purpose would."""
    state = json.loads((path / "state.json").read_text())
    state["files"] = {name: ckpt._sha256(path / name) for name in state["files"]}
    (path / "state.json").write_text(json.dumps(state))


def _trained(steps: int = 3):
    task = TaskWithTeacher()
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ema = EMA(task.model, 0.5)
    for _ in range(steps):
        loss = task(torch.randn(5, 3), 0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(task.model)
    return task, opt, sched, ema


def test_round_trip_and_no_pickles(tmp_path):
    task, opt, sched, ema = _trained()
    path = save_checkpoint(tmp_path, 3, task, ema, opt, sched, config={"name": "x"}, extra={"k": (1, 2)})
    assert path.name == "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    ]  # fmt: skip

    task2, opt2, sched2, ema2 = _trained(1)
    state = load_checkpoint(tmp_path, task2, ema2, opt2, sched2)
    assert state["step"] == 3 and state["config"] == {"name": "x"}
    for (k, a), (_, b) in zip(task.state_dict().items(), task2.state_dict().items(), strict=True):
        if not k.startswith("teacher."):
            assert torch.equal(a, b), k
    assert all(torch.equal(v, ema2.state_dict()[k]) for k, v in ema.state_dict().items())
    ta, sa = flatten_optimizer_state(opt.state_dict())
    tb, sb = flatten_optimizer_state(opt2.state_dict())
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and sa == sb
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)  # tuples survive JSON
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()


def test_optimizer_flattening_round_trip():
    _, opt, _, _ = _trained()
    tensors, structure = flatten_optimizer_state(opt.state_dict())
    json.dumps(structure)  # structure is pure JSON
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(structure)))
    orig = opt.state_dict()
    assert back["param_groups"] == orig["param_groups"]
    assert back["state"].keys() == orig["state"].keys()
    for pid, entry in orig["state"].items():
        assert entry.keys() == back["state"][pid].keys()
        assert all(torch.equal(entry[k], back["state"][pid][k]) for k in entry)


def test_frozen_teacher_not_saved_and_strict_load(tmp_path):
    task, opt, sched, ema = _trained()
    path = save_checkpoint(tmp_path, 1, task, ema, opt)
    from safetensors.torch import load_file, save_file

    keys = set(load_file(str(path / "model.safetensors")))
    assert keys and not any(k.startswith("teacher.") for k in keys)
    assert "model.1.running_mean" in keys and "head.weight" in keys  # buffers are kept
    assert json.loads((path / "state.json").read_text())["frozen_prefixes"] == ["teacher."]
    # a missing entry and an unknown entry are both refused, by name
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("head.bias")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        load_checkpoint(path, TaskWithTeacher())
    _rehash(path)
    with pytest.raises(KeyError, match="head.bias"):
        load_checkpoint(path, TaskWithTeacher())
    tensors["head.bias"] = torch.zeros(4)
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    _rehash(path)
    with pytest.raises(KeyError, match="extra.weight"):
        load_checkpoint(path, TaskWithTeacher())


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    task, opt, sched, ema = _trained()
    save_checkpoint(tmp_path, 1, task, ema, opt, sched)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(1.0)
    real_replace = ckpt.os.replace

    def crash(src, dst):  # the write fails between writing the files and renaming the folder
        raise OSError(28, "simulated failure before rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated failure.*previous checkpoints .* are intact"):
        save_checkpoint(tmp_path, 2, task, ema, opt, sched)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the failed write cleaned up after itself
    fresh = TaskWithTeacher()
    assert load_checkpoint(tmp_path, fresh, EMA(fresh.model), None, None)["step"] == 1
    # a process killed mid-write leaves its temporary folder (pid in the name): the next save removes it once that
    # process is gone, and a step folder without state.json (a kill during rotation) too
    (tmp_path / ".tmp-step_00000002-999999999").mkdir()
    (tmp_path / "step_00000000").mkdir()
    save_checkpoint(tmp_path, 2, task, ema, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_rewrite_same_step_and_keep_last(tmp_path):
    task, opt, sched, ema = _trained()
    for step in (1, 2, 3, 3):
        save_checkpoint(tmp_path, step, task, ema, opt, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert find_checkpoint(tmp_path.parent / tmp_path.name).name == "step_00000003"
    assert find_checkpoint(tmp_path / "missing") is None


def test_rng_states_restored(tmp_path):
    task, opt, _, _ = _trained()
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()  # leaves numpy's cached Gaussian set
    save_checkpoint(tmp_path, 1, task)
    expected = (torch.rand(3), np.random.randn(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    load_checkpoint(tmp_path, restore_rng=True)
    got = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_load_task_rebuilds_from_config(tmp_path):
    from unirep.toy import ToyFlowTask, VelocityMLP

    task = ToyFlowTask(VelocityMLP(hidden=16, depth=2))
    ema = EMA(task.model, 0.5)
    with torch.no_grad():
        for p in task.model.parameters():
            p.mul_(2.0)
    ema.update(task.model)  # EMA = 1.5 x initial weights, live = 2 x
    config = {
        "task": {
            "_target_": "unirep.toy.ToyFlowTask",
            "model": {"_target_": "unirep.toy.VelocityMLP", "hidden": 16, "depth": 2},
        }
    }
    save_checkpoint(tmp_path / "checkpoints", 7, task, ema, config=config)
    loaded, cfg = load_task(tmp_path)
    assert cfg.task.model.hidden == 16 and not loaded.training
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    live, _ = load_task(tmp_path / "checkpoints" / "step_00000007", ema=False)
    assert all(torch.equal(a, b) for a, b in zip(live.model.parameters(), task.model.parameters(), strict=True))
    save_checkpoint(tmp_path / "other", 1, task)
    with pytest.raises(KeyError, match="config.task"):
        load_task(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_task(tmp_path / "nothing")
