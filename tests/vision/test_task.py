"""VisionFlowTask on alignment terms: every recipe's terms train, their specifics, sampling, evaluation."""

import functools
import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from unirep.align import (
    AlignmentTerm,
    EMATarget,
    LayerTarget,
    ProjectorMLP,
    StopAtStep,
    TeacherTarget,
    dispersive_loss,
    smooth_l1,
)
from unirep.flow import FlowMatching
from unirep.train import DataModule
from vision.align import AttentionDistillTerm
from vision.data import DigitsDataset
from vision.encoders import TimmViTEncoder
from vision.models.sit import create_sit
from vision.task import ClassTokenFlow, VisionFlowTask


@pytest.fixture(scope="module")
def data():
    kw = dict(resolution=16, channels=1)
    return DataModule(train=DigitsDataset("train", **kw), val=DigitsDataset("val", **kw), info={})


def _proj(hidden=32, layers=3):
    return functools.partial(ProjectorMLP, hidden_dim=hidden, num_layers=layers)


def _repa(mode="tokens", schedule=None):
    return AlignmentTerm(2, _proj(), TeacherTarget(mode=mode), "neg_cosine", 0.5, schedule)


# the recipes of configs/experiment/vision/ as terms (their configs are composed in test_recipes.py)
RECIPES = {
    "sit": lambda: {},
    "repa": lambda: {"repa": _repa()},
    "reg": lambda: {"repa": _repa("pooled+tokens")},
    "haste": lambda: {
        "repa": _repa(schedule=StopAtStep(0.5, 1)),
        "attn": AttentionDistillTerm([1, 2], [3, 4], schedule=StopAtStep(0.5, 1)),
    },
    "sra": lambda: {
        "sra": AlignmentTerm(
            2, _proj(128, 2), EMATarget(3, decay=0.9, time_offset=0.2), functools.partial(smooth_l1, beta=0.05), 0.5
        )
    },
    "layersync": lambda: {"layersync": AlignmentTerm(2, None, LayerTarget(4), "neg_cosine", 0.2)},
    "dispersive": lambda: {"dispersive": AlignmentTerm(1, None, None, functools.partial(dispersive_loss, tau=0.5))},
}


def _task(recipe, **kw):
    torch.manual_seed(0)
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    reg = recipe == "reg"
    model = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10, cls_token_dim=96 if reg else None)
    args = dict(
        align=RECIPES[recipe](),
        teacher=teacher,
        cls_token=ClassTokenFlow(0.03) if reg else None,
        eval_samples=30,
        eval_batch=16,
        sample_steps=3,
    )
    args.update(kw)
    return VisionFlowTask(model, **args)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_trains(recipe, data):
    task = _task(recipe)
    batch = default_collate([data.train[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    outs = []
    for step in range(2):
        out = task(batch, step)
        assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.on_step_end(step)
        outs.append(out)
    assert any(not torch.equal(before[n], p) for n, p in task.model.named_parameters())
    assert all(not p.requires_grad for p in task.teacher.parameters())
    for name in task.alignment.terms:
        assert f"loss/{name}" in out and f"align/{name}/weight" in out
    if recipe in ("repa", "reg", "sra", "layersync"):
        name = next(iter(task.alignment.terms))
        assert -1 <= float(out[f"align/{name}/cos"]) <= 1
    if recipe == "haste":  # both terms stop at step 1: weight 0.5 at step 0, 0 from step 1 on
        first = outs[0]
        assert float(first["align/repa/weight"]) == 0.5 and float(first["align/attn/weight"]) == 0.5
        assert float(first["loss/attn"]) > 0
        expect = first["loss/flow"] + 0.5 * first["loss/repa"] + 0.5 * first["loss/attn"]
        assert torch.allclose(first["loss"].detach(), expect, atol=1e-5)
        assert float(out["align/repa/weight"]) == 0.0 and float(out["align/attn/weight"]) == 0.0
        assert torch.allclose(out["loss"], out["loss/flow"])
    if recipe == "reg":
        expect = out["loss/flow"] + 0.03 * out["loss/cls"] + 0.5 * out["loss/repa"]
        assert torch.allclose(out["loss"].detach(), expect, atol=1e-6)
    if recipe == "sra":  # the EMA copy moved towards the student but is not equal to it
        ema = dict(task.alignment.terms["sra"].target.ema.module.named_parameters())
        n = "blocks.0.attn.qkv.weight"
        assert not torch.equal(ema[n], before[n]) and not torch.equal(ema[n], task.model.get_parameter(n))


def test_repa_loss_is_negative_cosine_to_teacher_tokens(data):
    task = _task("repa")
    batch = default_collate([data.train[i] for i in range(4)])
    torch.manual_seed(1)
    out = task(batch, 0)
    tokens = task.teacher.encoder.encode(batch["image"])
    assert tokens.x.shape == (4 * 16, 96)  # teacher grid matched to the 4x4 student grid
    assert torch.allclose(out["loss"], out["loss/flow"] + 0.5 * out["loss/repa"])
    assert torch.allclose(out["loss/repa"], -out["align/repa/cos"], atol=1e-5)


def test_flow_loss_is_the_shared_objective(data):
    """The task's flow loss is FlowMatching.objective's: same draw (t, noise, label dropout) -> same number."""
    task = _task("sit", flow=FlowMatching(time_dist="logit_normal", shift=2.0))
    batch = default_collate([data.train[i] for i in range(4)])
    torch.manual_seed(3)
    out = task(batch, 0)
    torch.manual_seed(3)
    x = batch["x"]
    step = FlowMatching(time_dist="logit_normal", shift=2.0).objective(
        x, lambda s: task.model(s.x_t, s.t_in, batch["y"].long())
    )
    assert torch.allclose(out["loss/flow"], step.loss)


def test_ema_rerun_sees_the_same_data_noise_and_dropped_labels(data):
    task = _task("sra")
    term = task.alignment.terms["sra"]
    term.target.time_offset = 0.0  # the EMA copy at the student's own time ...
    term.target.ema.module.load_state_dict(task.model.state_dict())  # ... with the student's weights
    batch = default_collate([data.train[i] for i in range(4)])
    seen = {}
    original = AlignmentTerm.forward

    def spy(self, ctx, step):
        seen["student"] = ctx.features[2].x
        seen["ema"] = ctx.rerun(task.model, ctx.t, [2])[0].x
        return original(self, ctx, step)

    task.model.eval()  # no dropout draws beyond the task's own
    AlignmentTerm.forward = spy
    try:
        task(batch, 0)
    finally:
        AlignmentTerm.forward = original
    assert torch.allclose(seen["student"], seen["ema"], atol=1e-6)


def test_bad_label_and_config_errors(data):
    task = _task("sit")
    batch = default_collate([data.train[i] for i in range(2)])
    batch["y"][1] = 12
    with pytest.raises(ValueError, match=r"label 12 \(item 'digits/\d+'\) is outside \[0, 10\)"):
        task(batch, 0)
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    plain = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="cls_token_dim"):
        VisionFlowTask(plain, align={"repa": _repa("pooled+tokens")}, teacher=teacher, cls_token=ClassTokenFlow())
    with pytest.raises(ValueError, match="needs the student's class token"):
        VisionFlowTask(plain, align={"repa": _repa("pooled+tokens")}, teacher=teacher)
    reg = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10, cls_token_dim=96)
    with pytest.raises(ValueError, match="pooled\\+tokens"):
        VisionFlowTask(reg, align={"repa": _repa("tokens")}, teacher=teacher, cls_token=ClassTokenFlow())
    with pytest.raises(ValueError, match="task's teacher"):
        VisionFlowTask(plain, align={"repa": _repa()})


def test_attention_distillation_matches_teacher_maps(data):
    """The loss is the cross-entropy to the teacher's patch-token maps; it is minimal when the student copies them."""
    from vision.align import attention_cross_entropy, teacher_attention_logits

    task = _task("haste")
    term = task.alignment.terms["attn"]
    assert term.student_attention() == [1, 2] and term.teacher_blocks == [3, 4] and term.heads == 3
    vit = task.teacher.encoder
    images = default_collate([data.train[i] for i in range(2)])["image"]
    logits = teacher_attention_logits(vit.model, vit.preprocess(images), [3, 4])
    assert logits[3].shape == (2, 3, 17, 17)  # 3 heads, class token + 16 patches
    # the hooked logits are the block's own: softmax(logits) @ v reproduces the timm attention output
    probs = logits[4][:, :, 1:, 1:].softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 16))
    p = probs[:, :, :1].clone()
    best = attention_cross_entropy(p.log(), p)
    worse = attention_cross_entropy(torch.zeros_like(p), p)
    assert float(best) < float(worse)


def test_reg_samples_class_token_with_its_own_scale():
    task = _task("reg", sampler="sde", cfg_scale=2.0)
    for m in task.model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    a, _ = task.generate(4, seed=0)
    b, _ = task.generate(4, seed=0, cls_cfg_scale=2.0)
    c, _ = task.generate(4, seed=0, cls_cfg_scale=1.5)
    assert torch.equal(a, c) and not torch.allclose(a, b)


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
    task = VisionFlowTask(model, sample_steps=1)  # one Euler step: channels do not mix yet
    plain, _ = task.generate(2, seed=0, cfg_scale=1.0)
    full, _ = task.generate(2, seed=0, cfg_scale=4.0)
    bug, _ = task.generate(2, seed=0, cfg_scale=4.0, guide_channels=3)
    assert not torch.allclose(full[:, 3], plain[:, 3])  # all channels guided
    assert torch.allclose(bug[:, 3], plain[:, 3], atol=1e-6)  # DiT's bug leaves channel 3 unguided
    assert torch.allclose(bug[:, :3], full[:, :3], atol=1e-6)


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
    with np.load(out["npz"]) as z:
        assert z["images"].shape == (12, 1, 16, 16) and z["labels"].tolist() == [i % 10 for i in range(12)]
