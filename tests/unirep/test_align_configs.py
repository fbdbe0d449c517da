"""Every ``configs/align/*.yaml`` instantiates and binds on a SiT and on a MACE model, and trains a step on both.

The terms are domain-agnostic: the same file aligns image patch tokens and per-atom features. A fake teacher of
width 5 returns one token per student token (patches or atoms), so the comparison itself is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from unirep.align import AlignContext, Alignment, AlignmentTerm
from unirep.tokens import TokenSet

ALIGN_DIR = Path(__file__).resolve().parents[2] / "configs" / "align"
NAMES = sorted(p.stem for p in ALIGN_DIR.glob("*.yaml"))
VISION_ONLY = {"haste_attention"}  # attention maps exist only in transformers


class PatchTeacher(nn.Module):
    """Images [B, C, H, W] -> one 5-d token per 4x4 patch (the student's grid)."""

    dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 5)

    def encode(self, x):
        p = torch.nn.functional.unfold(x.float(), 4, stride=4).transpose(1, 2)  # [B, N, 16]
        return TokenSet.from_dense(self.proj(p))

    def encode_pooled(self, x):
        return self.encode(x).pool("mean")


class AtomTeacher(nn.Module):
    """Graph batch -> one 5-d token per atom."""

    dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 5)

    def encode(self, batch):
        return TokenSet(self.emb(batch.numbers % 10), batch.batch, None, batch.num_graphs)

    def encode_pooled(self, batch):
        return self.encode(batch).pool("mean")


def _term(name: str) -> nn.Module:
    with initialize_config_dir(config_dir=str(ALIGN_DIR), version_base=None):
        cfg = compose(name)
    if "layer" in cfg:
        cfg.layer = 1
    if cfg.get("target") is not None and "layer" in cfg.target and cfg.target.layer is not None:
        cfg.target.layer = -1
    if cfg.get("schedule") is not None and "stop_step" in cfg.schedule:
        cfg.schedule.stop_step = 10
    return instantiate(cfg)


def _sit():
    from vision.models.sit import SiT

    torch.manual_seed(0)
    return SiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def _mace():
    from molecular.models import MACEModel

    torch.manual_seed(0)
    return MACEModel([1, 6, 8], num_channels=8, max_L=0, num_interactions=2, max_ell=2, correlation=2,
                     radial_mlp=(16,), mlp_irreps="8x0e", dtype="float32")  # fmt: skip


def _ethanol_batch():
    from molecular.data import AtomicGraph, collate_graphs, read_structures

    sample = Path(__file__).resolve().parents[2] / "data" / "molecular_sample" / "md_ethanol.extxyz"
    structs = read_structures(sample)[:2]
    return collate_graphs([AtomicGraph.from_structure(s, 5.0) for s in structs])


def test_every_align_config_found():
    assert {"repa", "reg", "haste", "sra", "layersync", "dispersive", "vf", "mace_repa", "conformer_repa"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_align_config_on_sit(name):
    if name in VISION_ONLY:
        pytest.skip("needs a ViT teacher's attention maps: tests/vision/test_task.py")
    model, teacher = _sit(), PatchTeacher()
    term = _term(name)
    if name in ("mace_repa", "conformer_repa"):  # molecular terms feed the whole batch; an image teacher reads x
        term.target.input_key = ("x",)
    al = Alignment({name: term}).bind(model, teacher=teacher)
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1])
    layers = al.student_layers()
    _, feats = model.forward_intermediates(x, t, y, layers)
    if name == "reg":  # [cls, patches] needs the student's own class token: covered by tests/vision/test_task.py
        return

    def rerun(module, tt, idx):
        return module.forward_intermediates(x, tt, y, idx)[1]

    ctx = AlignContext(batch={"x": x}, features=dict(zip(layers, feats, strict=True)), t=t, rerun=rerun)
    loss, logs = al(ctx, step=0)
    assert torch.isfinite(loss) and loss.requires_grad and f"loss/{name}" in logs
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_align_config_on_mace(name):
    if name in VISION_ONLY:
        pytest.skip("attention maps exist only in transformers")
    model, teacher = _mace(), AtomTeacher()
    term = _term(name)
    assert isinstance(term, AlignmentTerm)
    al = Alignment({name: term}).bind(model, teacher=teacher)
    batch = _ethanol_batch()
    layers = al.student_layers()
    _, feats = model.forward_intermediates(batch, layers)
    ctx = AlignContext(batch=batch, features=dict(zip(layers, feats, strict=True)))
    if name == "reg":
        return  # a molecule has no class token: bound, not run
    if name == "sra":  # an EMA target needs a generative task's re-noised input
        with pytest.raises(ValueError, match="EMA target needs"):
            al(ctx, step=0)
        return
    if name in ("repa", "haste", "vf"):  # image recipes read batch["image" | "x"]; a graph batch goes whole
        for tt in al.teacher_targets():
            tt.input_key = None
    loss, logs = al(ctx, step=0)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()


def test_the_documented_custom_method_is_one_config_plus_one_loss(tmp_path):
    """docs/architecture.md's "Adding an alignment method" example, verbatim in shape."""
    import unirep.align as A

    def margin_cosine(pred, target, margin=0.2):
        cos = A.token_cosine(pred, target)
        return A._item_mean(torch.relu(1.0 - margin - cos), pred)

    term = A.AlignmentTerm(1, A.ProjectorMLP(32, 5, 16), A.TeacherTarget(None), loss=margin_cosine, weight=0.5)
    model, teacher = _sit(), PatchTeacher()
    al = Alignment({"margin": term}).bind(model, teacher=teacher)
    x = torch.randn(2, 1, 16, 16)
    _, feats = model.forward_intermediates(x, torch.rand(2), torch.tensor([0, 1]), [1])
    loss, logs = al(AlignContext(batch={"x": x}, features={1: feats[0]}), 0)
    assert torch.isfinite(loss) and "align/margin/cos" in logs
