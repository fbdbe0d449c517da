"""Real processes: two trainings on one out_dir (case 49), SIGTERM exits 143 and resumes bit for bit (case 56's
signal half), kill -9 at random moments resumes bit for bit and leaves no orphan folder (the rotation case)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reliability.conftest import TOY, train
from unirep.train.checkpoint import list_checkpoints, read_state

REPO = Path(__file__).resolve().parents[2]


def _spawn(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "unirep.cli", *TOY, f"out_dir={out_dir}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode}): {proc.stdout.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model", "ema", "optimizer"):
        out.update({f"{name}/{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_case_49_two_runs_one_out_dir_and_sigterm_exits_143_resuming_bit_for_bit(tmp_path):
    """A second training on a live run's out_dir is refused by name; the first, stopped by SIGTERM, exits 143 with a
    checkpoint, and its resume equals an uninterrupted run bit for bit."""
    out, const = tmp_path / "cut", "trainer.lr_schedule=constant"  # a schedule that does not depend on max_steps
    proc = _spawn(out, "trainer.max_steps=1000000", "trainer.ckpt_every=0", const)
    try:
        _wait_for(lambda: (out / "metrics.csv").is_file(), proc)
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {proc.pid} "):
            train(out, const)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        assert "stopped by SIGTERM" in proc.stdout.read()
    finally:
        proc.kill()
    (last,) = list_checkpoints(out / "checkpoints")
    stop = read_state(last)["step"]
    target = stop + 4
    train(out, "trainer.resume=auto", f"trainer.max_steps={target}", "trainer.ckpt_every=0", const)
    train(tmp_path / "full", f"trainer.max_steps={target}", "trainer.ckpt_every=0", const)
    name = f"step_{target:08d}"
    _assert_same(out / "checkpoints" / name, tmp_path / "full" / "checkpoints" / name)


def _newest(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name.split("_")[1]) if found else -1


def test_kill_9_at_random_moments_resumes_bit_for_bit(tmp_path):
    out, steps = tmp_path / "killed", 120
    rng = random.Random(0)
    args = (f"trainer.max_steps={steps}", "trainer.ckpt_every=1", "trainer.keep_last=2", "trainer.resume=auto")
    for _ in range(2):
        proc = _spawn(out, *args)
        try:
            before = _newest(out)
            _wait_for(lambda b=before: _newest(out) > b, proc)  # it trained past where it started
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
    assert list_checkpoints(out / "checkpoints"), "the newest checkpoint always loads"
    result = train(out, *args)
    assert result["step"] == steps
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if not (p / "state.json").is_file()]
    assert leftovers == []  # temporary and orphan folders of the killed runs were cleaned
    train(tmp_path / "full", f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}")
    name = f"step_{steps:08d}"
    _assert_same(out / "checkpoints" / name, tmp_path / "full" / "checkpoints" / name)
