"""DDP under torchrun (gloo, CPU, 2 ranks) equals one process with the same global batch."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("_unirep_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ddp
def test_two_ranks_equal_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    # 2 ranks x 2 accumulation steps x 2 items = the global batch of 8
    proc = subprocess.run([*cmd, str(ddp_dir), "2"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    _load_worker().run(str(single_dir), 1)

    a = single_dir / "checkpoints" / "step_00000006"
    b = ddp_dir / "checkpoints" / "step_00000006"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0), (name, k, (ta[k] - tb[k]).abs().max())
    # the weights moved (the comparison is not between two untouched initialisations)
    init = _load_worker().Regression().state_dict()
    assert not torch.allclose(load_file(str(a / "model.safetensors"))["model.0.weight"], init["model.0.weight"])
    # both ranks' generator states are saved; only rank 0 wrote logs and checkpoints
    ranks = {k.split("/")[0] for k in load_file(str(b / "rng.safetensors"))}
    assert ranks == {"rank0", "rank1"}
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    with open(ddp_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6]
