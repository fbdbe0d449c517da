"""VisionFlowTask: every recipe trains, the recipes' specifics, sampling shapes/determinism, evaluation metrics."""

import json

import pytest
import torch
from torch.utils.data import default_collate

from unirep.train import DataModule
from vision.data import DigitsDataset
from vision.encoders import TimmViTEncoder
from vision.models.sit import create_sit
from vision.task import RECIPES, VisionFlowTask, frechet_distance, knn_precision_recall


@pytest.fixture(scope="module")
def data():
    kw = dict(resolution=16, channels=1)
    return DataModule(train=DigitsDataset("train", **kw), val=DigitsDataset("val", **kw), info={})


def _task(recipe, **kw):
    torch.manual_seed(0)
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    model = create_sit(
        "SiT-tiny/4", input_size=16, in_channels=1, num_classes=10, cls_token_dim=96 if recipe == "reg" else None
    )
    args = dict(
        recipe=recipe,
        teacher=teacher,
        align_depth=2,
        target_depth=4,
        align_stop_step=1,
        projector_dim=32,
        eval_samples=30,
        eval_batch=16,
        sample_steps=3,
    )
    args.update(kw)
    return VisionFlowTask(model, **args)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains(recipe, data):
    task = _task(recipe)
    batch = default_collate([data.train[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    for step in range(2):
        out = task(batch, step)
        assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.on_step_end(step)
    assert any(not torch.equal(before[n], p) for n, p in task.model.named_parameters())
    assert all(not p.requires_grad for p in task.teacher.parameters())
    if recipe in ("repa", "reg", "haste", "sra", "layersync"):
        assert "align/cos" in out and -1 <= float(out["align/cos"]) <= 1
    if recipe == "haste":  # align_stop_step=1: the weight is 0.5 at step 0 and 0 from step 1
        assert float(out["align/weight"]) == 0.0 and torch.allclose(out["loss"], out["loss/flow"])
    if recipe == "reg":
        assert torch.allclose(out["loss"].detach(), out["loss/flow"] + 0.03 * out["loss/cls"] + 0.5 * out["loss/align"])
    if recipe == "sra":  # the EMA copy moved towards the student but is not equal to it
        ema = dict(task.ema_teacher.module.named_parameters())
        n = "blocks.0.attn.qkv.weight"
        assert not torch.equal(ema[n], before[n]) and not torch.equal(ema[n], task.model.get_parameter(n))


def test_repa_loss_is_negative_cosine_to_teacher_tokens(data):
    task = _task("repa")
    batch = default_collate([data.train[i] for i in range(4)])
    torch.manual_seed(1)
    out = task(batch, 0)
    tokens = task.teacher.encoder.encode(batch["image"])
    assert tokens.x.shape == (4 * 16, 96)  # teacher grid matched to the 4x4 student grid
    assert torch.allclose(out["loss"], out["loss/flow"] + 0.5 * out["loss/align"])
    assert torch.allclose(out["loss/align"], -out["align/cos"], atol=1e-5)


def test_bad_label_and_recipe_errors(data):
    task = _task("sit")
    batch = default_collate([data.train[i] for i in range(2)])
    batch["y"][1] = 12
    with pytest.raises(ValueError, match=r"label 12 \(item 'digits/\d+'\) is outside \[0, 10\)"):
        task(batch, 0)
    with pytest.raises(ValueError, match="unknown recipe"):
        _task("repa2")
    with pytest.raises(ValueError, match="cls_token_dim"):
        VisionFlowTask(
            create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10),
            recipe="reg",
            teacher=TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True),
        )


@pytest.mark.parametrize("recipe,sampler", [("repa", "euler"), ("repa", "heun"), ("reg", "sde")])
def test_sampling_shapes_and_determinism(recipe, sampler):
    task = _task(recipe, sampler=sampler, cfg_scale=2.0)
    for m in task.model.modules():  # a non-zero output layer, so samples depend on the model
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    a, la = task.generate(6, seed=3)
    # ODE samples do not depend on the batch split; SDE noise is drawn per batch, so keep the split there
    b, _ = task.generate(6, seed=3, batch_size=6 if sampler == "sde" else 4)
    c, _ = task.generate(6, seed=4)
    assert a.shape == (6, 1, 16, 16) and la.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)


def test_guidance_all_channels_vs_dit_bug():
    torch.manual_seed(0)
    model = create_sit("SiT-tiny/4", input_size=16, in_channels=4, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    task = VisionFlowTask(model, recipe="sit", sample_steps=1)  # one Euler step: channels do not mix yet
    plain, _ = task.generate(2, seed=0, cfg_scale=1.0)
    full, _ = task.generate(2, seed=0, cfg_scale=4.0)
    bug, _ = task.generate(2, seed=0, cfg_scale=4.0, guide_channels=3)
    assert not torch.allclose(full[:, 3], plain[:, 3])  # all channels guided
    assert torch.allclose(bug[:, 3], plain[:, 3], atol=1e-6)  # DiT's bug leaves channel 3 unguided
    assert torch.allclose(bug[:, :3], full[:, :3], atol=1e-6)


def test_frechet_distance_closed_forms():
    torch.manual_seed(0)
    a = torch.randn(4000, 3, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0, abs=1e-8)
    # zero-mean a vs 2a: tr(S + 4S - 2 * 2S) = tr(S)
    a = a - a.mean(0)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(torch.trace(torch.cov(a.T))), rel=1e-6)


def test_knn_precision_recall():
    torch.manual_seed(0)
    real = torch.randn(200, 4)
    p, r = knn_precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    assert knn_precision_recall(real, far, k=3) == (0.0, 0.0)
    collapsed = real[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 4)  # mode collapse: precise, no recall
    p, r = knn_precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.1


def test_evaluate_and_sample_write_outputs(data, tmp_path):
    task = _task("repa")
    metrics = task.evaluate(data, tmp_path, step=7)
    for key in ("fd_teacher", "precision", "recall", "cond_accuracy", "classifier_val_accuracy"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["classifier_val_accuracy"] > 0.85  # the separately trained classifier is a good judge
    saved = json.loads((tmp_path / "eval" / "metrics_step_00000007.json").read_text())
    assert saved["fd_teacher"] == pytest.approx(metrics["fd_teacher"]) and "unavailable" in saved["fid"]
    assert (tmp_path / "eval" / "samples_step_00000007.png").exists()
    out = task.sample(tmp_path / "s", num=12, seed=0)
    import numpy as np

    with np.load(out["npz"]) as z:
        assert z["images"].shape == (12, 1, 16, 16) and z["labels"].tolist() == [i % 10 for i in range(12)]
