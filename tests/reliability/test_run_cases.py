"""Cases 45-59 of RELIABILITY_CASES.md: out_dir faults, unhealthy runs, resume with a changed config, interrupts."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import signal
import threading

import pytest
import torch

import unirep.train.checkpoint as ckpt_module
from tests.reliability.conftest import Regression, ckpt, flat_state, regression_trainer, toy_cfg, train
from unirep.cli import _preflight_out_dir, _train_main
from unirep.train import lr_factor
from unirep.train.checkpoint import CheckpointMismatchError, OutDirLock, list_checkpoints


def test_case_45_out_dir_under_a_read_only_mount(tmp_path, monkeypatch):
    real_mkdir = type(tmp_path).mkdir

    def read_only(self, *a, **kw):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(type(tmp_path), "mkdir", read_only)
    with pytest.raises(OSError) as e:
        train(tmp_path / "ro" / "run")
    assert str(tmp_path / "ro" / "run") in str(e.value) and "writable out_dir" in str(e.value)


def test_case_46_out_dir_is_a_read_only_folder(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(OutDirLock, "acquire", denied)
    with pytest.raises(OSError, match="cannot be written .*writable out_dir"):
        train(tmp_path / "run")
    # the command line names it before hydra's log handler would fail with "Unable to configure handler 'file'"
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit, match="is not writable"):
        _preflight_out_dir(["experiment=toy", f"out_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("where", ["is", "under"])
def test_case_47_out_dir_is_a_file(tmp_path, where):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    out = f if where == "is" else f / "run"
    with pytest.raises(OSError) as e:
        train(out)
    assert str(out) in str(e.value)
    with pytest.raises(SystemExit, match="is a file"):
        _preflight_out_dir(["experiment=toy", f"out_dir={out}"])
    assert f.read_text() == "keep me"


def test_case_48_disk_full_while_checkpointing(tmp_path, monkeypatch):
    real = ckpt_module._save_tensors
    calls = {"n": 0}

    def full_disk(tensors, path):
        if path.parent.name.startswith(".tmp-step_00000004"):
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real(tensors, path)

    monkeypatch.setattr(ckpt_module, "_save_tensors", full_disk)
    with pytest.raises(OSError) as e:
        train(tmp_path / "run", "trainer.max_steps=6")
    assert "No space left" in str(e.value) and "are intact" in str(e.value) and "trainer.resume=auto" in str(e.value)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no partial .tmp left to block the resume
    monkeypatch.setattr(ckpt_module, "_save_tensors", real)
    assert train(tmp_path / "run", "trainer.max_steps=6", "trainer.resume=auto")["step"] == 6


def test_case_49_two_runs_one_out_dir(tmp_path, capsys):
    """In-process: a held lock refuses a second run by name; a dead holder's lock is taken over (the subprocess
    version with two real trainings is in test_processes.py)."""
    out = tmp_path / "run"
    out.mkdir()
    holder = OutDirLock(out)
    holder.acquire()
    try:
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {os.getpid()}"):
            train(out)
    finally:
        holder.release()
    (out / ".unirep.lock").write_text("pid 999999999 on elsewhere since 2020-01-01 00:00:00")  # a killed run's file
    assert train(out)["step"] == 4
    assert "stale lock" in capsys.readouterr().out


def test_case_50_huge_learning_rate(tmp_path):
    with pytest.raises(FloatingPointError, match="learning rate"):
        train(tmp_path / "run", "optimizer.lr=1e9", "trainer.max_steps=60", "trainer.max_bad_steps=3")


def test_case_51_no_checkpoint_while_weights_explode(tmp_path, capsys):
    def explode(step, task):
        if 31 <= step <= 33:
            with torch.no_grad():
                task.model[0].weight.mul_(10.0)

    trainer = regression_trainer(Regression(explode), tmp_path / "run", max_steps=50, ckpt_every=10, keep_last=2)
    with pytest.raises(FloatingPointError, match="ended unhealthy .*step_00000030"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000020", "step_00000030"]
    assert "no checkpoint at step 40: the weights' norm grew" in capsys.readouterr().out
    with pytest.raises(ValueError, match="min_lr_ratio"):  # the unvalidated escape hatch of the report is closed
        regression_trainer(Regression(), tmp_path / "run", min_lr_ratio=1e12, resume="auto")


def _rows(out):
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def test_case_52_resume_with_a_new_learning_rate(tmp_path, capsys):
    const = ["trainer.lr_schedule=constant", "trainer.warmup_steps=0"]
    train(tmp_path / "run", *const)
    train(tmp_path / "run", *const, "trainer.resume=auto", "trainer.max_steps=6", "optimizer.lr=1e-6")
    assert math.isclose(float(_rows(tmp_path / "run")[6]["lr"]), 1e-6, rel_tol=1e-9)  # applied, not ignored
    assert "optimizer.lr 0.002 -> 1e-06" in capsys.readouterr().out
    state = json.loads((ckpt(tmp_path / "run", 6) / "state.json").read_text())
    assert state["config"]["optimizer"]["lr"] == 1e-6
    assert state["extra"]["resume_changes"][0]["changes"]["optimizer.lr"] == [0.002, 1e-6]  # recorded


def test_case_53_resume_with_a_new_max_steps_recomputes_the_schedule(tmp_path, capsys):
    train(tmp_path / "run")
    train(tmp_path / "run", "trainer.resume=auto", "trainer.max_steps=8")
    assert "trainer.max_steps 4 -> 8" in capsys.readouterr().out
    rows = _rows(tmp_path / "run")
    for s in (6, 8):  # the toy recipe: lr 2e-3, warm-up 2 here, cosine to 0.05
        assert math.isclose(float(rows[s]["lr"]), 2e-3 * lr_factor(s, 8, 2, "cosine", 0.05), rel_tol=1e-9)


def test_case_54_resume_with_a_new_batch_size(tmp_path):
    train(tmp_path / "run")
    with pytest.warns(UserWarning, match="batch_size/seed 64/0 instead of 32/0"):
        train(tmp_path / "run", "trainer.resume=auto", "trainer.max_steps=6", "trainer.batch_size=64")


def test_case_55_rerun_with_resume_none_into_a_finished_run(tmp_path):
    out = tmp_path / "run"
    train(out, "trainer.max_steps=6")  # the "old" run: step 6 sorts above the new run's step 4
    with pytest.raises(FileExistsError, match="trainer.overwrite=true"):
        train(out, "trainer.resume=none")
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_00000006"  # nothing lost
    result = train(out, "trainer.resume=none", "trainer.overwrite=true")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert result["checkpoint"] == ckpt(out, 4)
    assert sorted(_rows(out)) == [2, 4]  # metrics.csv is the new run's


class Failing(Regression):
    def __init__(self, fail_at=None, on_forward=None):
        super().__init__()
        self.fail_at, self.on_forward = fail_at, on_forward

    def forward(self, batch, step):
        if self.on_forward is not None:
            self.on_forward(step)
        if step == self.fail_at:
            raise RuntimeError("cannot read image x.png: truncated")
        return super().forward(batch, step)


def _full(tmp_path):
    torch.manual_seed(0)
    t = regression_trainer(Regression(), tmp_path / "full", ckpt_every=0)
    t.fit()
    return flat_state(t)


def test_case_56_ctrl_c_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    full = _full(tmp_path)
    torch.manual_seed(0)
    task = Regression(lambda step, _: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None)
    result = regression_trainer(task, tmp_path / "cut", ckpt_every=0).fit()
    assert result["interrupted"] and result["signal"] == "SIGINT" and result["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_00000003"]
    resumed = regression_trainer(Regression(), tmp_path / "cut", ckpt_every=0)
    resumed.fit()
    assert torch.equal(flat_state(resumed), full)


def test_case_56b_exception_and_second_ctrl_c_write_an_emergency_checkpoint(tmp_path, capsys):
    full = _full(tmp_path)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="truncated"):  # a corrupt item reached mid-run
        regression_trainer(Failing(fail_at=5), tmp_path / "cut", ckpt_every=0).fit()
    assert "emergency checkpoint of step 5" in capsys.readouterr().out
    resumed = regression_trainer(Regression(), tmp_path / "cut", ckpt_every=0)
    resumed.fit()
    assert torch.equal(flat_state(resumed), full)  # nothing since the last checkpoint was lost, and bit for bit

    def twice(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        regression_trainer(Failing(on_forward=twice), tmp_path / "twice", ckpt_every=0).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "twice" / "checkpoints")] == ["step_00000004"]


def test_case_56c_signal_stop_exits_non_zero(tmp_path):
    cfg = toy_cfg(tmp_path / "run", "trainer.max_steps=1000000", "trainer.ckpt_every=0")
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(SystemExit) as e:
            _train_main(cfg)
    finally:
        timer.cancel()
    assert e.value.code == 130
    assert list_checkpoints(tmp_path / "run" / "checkpoints")  # the work was kept


def test_case_57_torn_metrics_row(tmp_path):
    out = tmp_path / "run"
    train(out)
    text = (out / "metrics.csv").read_text()
    (out / "metrics.csv").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + "4,3.1e")  # killed mid-write
    with pytest.warns(UserWarning, match="metrics.csv:3: skipping a torn"):
        train(out, "trainer.resume=auto", "trainer.max_steps=6")
    assert sorted(_rows(out)) == [2, 6]  # the torn row of step 4 is dropped, the rest reads as one run


def test_case_58_regenerated_data_with_the_same_ids_gets_new_features():
    """The feature cache is keyed by content (unirep.encoders, another engineer's files)."""
    from torch import nn

    from unirep.encoders import FrozenEncoder
    from unirep.tokens import TokenSet

    class Enc(nn.Module):
        dim = 2

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def encode(self, x):
            return TokenSet.from_dense(self.lin(x))

    teacher = FrozenEncoder(Enc())
    ids = ["item0", "item1"]
    old, new = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    teacher.encode(old, ids=ids)
    got = teacher.encode(new, ids=ids).x
    assert torch.allclose(got, Enc.encode(teacher.encoder, new).x)


def test_case_59_resume_into_another_model_shape(tmp_path):
    train(tmp_path / "run")
    with pytest.raises(ValueError, match=r"task.model.hidden: 16 -> 32"):
        train(tmp_path / "run", "trainer.resume=auto", "trainer.max_steps=6", "task.model.hidden=32")

    class Wider(Regression):
        def __init__(self):
            super().__init__()
            self.model[0] = torch.nn.Linear(3, 16)
            self.model[2] = torch.nn.Linear(16, 1)

    regression_trainer(Regression(), tmp_path / "direct", max_steps=2).fit()
    with pytest.raises(CheckpointMismatchError) as e:
        regression_trainer(Wider(), tmp_path / "direct", max_steps=4).fit()
    msg = str(e.value)
    assert "model.0.bias has shape [8] in the checkpoint but [16]" in msg and "config's model differs" in msg
