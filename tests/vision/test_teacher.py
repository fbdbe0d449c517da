"""The self-trained teacher: MAE training writes a weights file that loads through the DINOv2 pretrained_path code."""

import json

import torch
from safetensors.torch import load_file

from vision.encoders import TimmViTEncoder
from vision.teacher import digits_teacher, ensure_digits_teacher, linear_probe, train_digits_teacher


def test_train_save_load_and_reuse(tmp_path):
    path = tmp_path / "teacher.safetensors"
    info = train_digits_teacher(path, steps=3, batch_size=16, log_every=0, probe=False)
    assert path.exists() and json.loads(path.with_suffix(".json").read_text()) == info
    assert info["objective"] == "mae" and info["steps"] == 3 and info["resolution"] == 16
    saved = load_file(str(path))
    enc = TimmViTEncoder("unirep_vit_digits", img_size=16, pretrained_path=str(path))
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    mtime = path.stat().st_mtime_ns
    assert ensure_digits_teacher(path) == path and path.stat().st_mtime_ns == mtime  # present: not retrained
    t = digits_teacher(grid_size=8, pretrained_path=str(path))  # a student grid of 8: 32 px input, pos-embed resampled
    assert t.encode(torch.zeros(2, 1, 16, 16)).x.shape == (2 * 64, 96)
    assert torch.equal(t.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


def test_linear_probe_separates_linearly_separable_tokens():
    class Fake:  # pooled features that are the one-hot label: a perfect probe
        def encode_pooled(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    y = torch.arange(60) % 3
    x = y.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    assert linear_probe(Fake(), x, y, x[:30], y[:30]) == 1.0


def test_missing_teacher_stops_with_the_command(tmp_path):
    import pytest

    from vision.teacher import TEACHER_COMMAND

    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        digits_teacher(grid_size=4, pretrained_path=str(missing))
    assert TEACHER_COMMAND in str(err.value) and str(missing) in str(err.value)
    assert "allow_random_init=true" in str(err.value)
    with pytest.raises(ValueError, match="no longer trains"):
        digits_teacher(train_if_missing=True)
    assert digits_teacher(grid_size=4, allow_random_init=True).grid_size == 4


def test_mae_task_step_is_replayable_and_reaches_every_parameter():
    from vision.teacher import MAETeacherTask

    torch.manual_seed(0)
    task = MAETeacherTask()
    batch = {"x": torch.rand(4, 1, 16, 16) * 2 - 1}
    a, b, c = task(batch, 7)["loss"], task(batch, 7)["loss"], task(batch, 8)["loss"]
    assert torch.equal(a, b) and not torch.equal(a, c)  # the step's masks and augmentation depend on (seed, step)
    a.backward()
    no_grad = [n for n, p in task.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad and all(torch.isfinite(p.grad).all() for p in task.model.parameters() if p.grad is not None)
