"""Shared test set-up: offline hubs, a headless plotting backend, at most 2 threads, fixed seeds per test."""

from __future__ import annotations

import os

# set before anything imports huggingface_hub / matplotlib (timm retries downloads for ~47 s otherwise)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same generator states, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def out_dir(tmp_path):
    """A fresh output folder for a run (``tmp_path / "run"``)."""
    path = tmp_path / "run"
    path.mkdir()
    return path
