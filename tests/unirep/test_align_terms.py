"""Alignment terms: one code path for teacher, EMA, layer and no targets; the index convention; dispersive gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import unirep.align as A
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.tokens import TokenSet


class TinyBackbone(nn.Module):
    """L linear blocks over dense tokens ``[B, N, D]``; index 0 = input, k = output of block k."""

    def __init__(self, depth: int = 3, dim: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.num_layers, self.dim = depth, dim

    def feature_dim(self, index: int) -> int:
        return self.dim

    def forward_intermediates(self, x, indices):
        idx = feature_take_indices(self.num_layers, indices)
        hs = [x]
        for blk in self.blocks:
            hs.append(torch.tanh(blk(hs[-1])))
        return hs[-1], [TokenSet.from_dense(hs[i]) for i in idx]


class FakeTeacher(nn.Module):
    def __init__(self, dim: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(6, dim)
        self.dim = dim
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        return TokenSet.from_dense(self.proj(x))

    def encode_pooled(self, x):
        return self.proj(x).mean(1)


def _ctx(model, x, layers, **kw):
    _, feats = model.forward_intermediates(x, layers)
    return A.AlignContext(batch={"x": x}, features=dict(zip(layers, feats, strict=True)), **kw)


def test_feature_take_indices_follow_timm_convention():
    assert feature_take_indices(4, None) == [0, 1, 2, 3, 4]
    assert feature_take_indices(4, -1) == [4]
    assert feature_take_indices(4, [0, -2, 3]) == [0, 3, 3]
    assert normalize_index(-5, 4) == 0
    with pytest.raises(ValueError, match="outside"):
        normalize_index(5, 4)
    with pytest.raises(ValueError, match="outside"):
        normalize_index(-6, 4)
    with pytest.raises(TypeError):
        normalize_index(1.5, 4)  # type: ignore[arg-type]


def test_teacher_term_equals_repa_definition_and_projector_is_built_with_widths():
    torch.manual_seed(0)
    model, teacher = TinyBackbone(), FakeTeacher()
    proj = lambda i, o: A.ProjectorMLP(i, o, hidden_dim=8)  # noqa: E731
    term = A.AlignmentTerm(layer=-2, projector=proj, target=A.TeacherTarget(teacher), loss="neg_cosine", weight=0.5)
    al = A.Alignment({"repa": term}).bind(model)
    assert term.layer == 2 and al.student_layers() == [2]
    assert term.projector.net[0].in_features == 6 and term.projector.out_dim == 5
    x = torch.randn(3, 4, 6)
    ctx = _ctx(model, x, al.student_layers())
    loss, logs = al(ctx, step=0)
    # REPA: -mean over batch and patches of cos(proj(h), y)
    h = ctx.features[2].x
    y = teacher.proj(x).reshape(-1, 5)
    ref = -torch.nn.functional.cosine_similarity(term.projector(h), y, dim=-1).mean()
    assert loss.item() == pytest.approx(0.5 * ref.item(), abs=1e-6)
    assert logs["loss/repa"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert logs["align/repa/cos"].item() == pytest.approx(-ref.item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in term.projector.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # frozen teacher


def test_stopped_term_skips_the_teacher():
    model, teacher = TinyBackbone(), FakeTeacher()
    term = A.AlignmentTerm(1, A.ProjectorMLP(6, 5, 8), A.TeacherTarget(teacher), schedule=A.StopAtStep(0.5, 2))
    al = A.Alignment({"haste": term}).bind(model)
    x = torch.randn(2, 4, 6)
    al(_ctx(model, x, [1]), step=1)
    n = teacher.calls
    loss, logs = al(_ctx(model, x, [1]), step=2)
    assert teacher.calls == n and loss.item() == 0.0 and logs["align/haste/weight"].item() == 0.0


def test_shared_teacher_is_called_once_per_step_and_pooled_tokens_prepend():
    model, teacher = TinyBackbone(), FakeTeacher()
    terms = {
        "a": A.AlignmentTerm(1, A.ProjectorMLP(6, 5, 8), A.TeacherTarget(None)),
        "b": A.AlignmentTerm(2, A.ProjectorMLP(6, 5, 8), A.TeacherTarget(None)),
    }
    al = A.Alignment(terms).bind(model, teacher=teacher)
    x = torch.randn(2, 4, 6)
    al(_ctx(model, x, [1, 2]), step=0)
    assert teacher.calls == 1
    cls = TokenSet.from_dense(torch.ones(2, 1, 3))
    rest = TokenSet.from_dense(torch.zeros(2, 4, 3))
    both = A.prepend_tokens(cls, rest)
    dense, _ = both.to_dense()
    assert dense.shape == (2, 5, 3) and torch.all(dense[:, 0] == 1) and torch.all(dense[:, 1:] == 0)


def test_layer_target_is_detached_and_ema_target_updates():
    torch.manual_seed(1)
    model = TinyBackbone()
    term = A.AlignmentTerm(1, None, A.LayerTarget(-1), loss="neg_cosine", weight=1.0)
    al = A.Alignment({"sync": term}).bind(model)
    assert al.student_layers() == [1, 3]
    x = torch.randn(2, 4, 6)
    loss, _ = al(_ctx(model, x, al.student_layers()), 0)
    loss.backward()
    # the deep layer is the target: block 3 (and 2) get no gradient from the alignment
    assert model.blocks[2].weight.grad is None and model.blocks[0].weight.grad is not None

    ema = A.EMATarget(layer=3, decay=0.5, time_offset=0.2)
    term = A.AlignmentTerm(1, lambda i, o: nn.Linear(i, o), ema, loss="mse", weight=1.0)
    al = A.Alignment({"sra": term}).bind(model)
    seen = {}

    def rerun(module, t, indices):
        seen["t"] = t
        return module.forward_intermediates(x, indices)[1]

    t = torch.tensor([0.1, 0.9])
    al(_ctx(model, x, al.student_layers(), t=t, rerun=rerun), 0)
    assert torch.all(seen["t"] <= t) and torch.all(seen["t"] >= (t - 0.2).clamp_min(0))
    before = ema.ema.module.blocks[0].weight.clone()
    with torch.no_grad():
        model.blocks[0].weight.add_(1.0)
    al.on_step_end(model)
    assert torch.allclose(ema.ema.module.blocks[0].weight, 0.5 * before + 0.5 * model.blocks[0].weight)


def test_dispersive_term_has_a_gradient_at_realistic_width():
    # the flaw the anchors' definition fixes: 256 tokens x 64 dims at init, raw squared distances ~ 1e4
    torch.manual_seed(2)
    z = torch.randn(8, 256, 64, requires_grad=True)
    loss = A.dispersive_loss(z, tau=0.5)
    loss.backward()
    assert torch.isfinite(loss) and z.grad.abs().sum() > 0
    zf = z.detach().reshape(8, -1)
    d = (zf[:, None] - zf[None]).pow(2).sum(-1) / zf.shape[1]
    assert loss.item() == pytest.approx(float(torch.logsumexp(-d.flatten() / 0.5, 0) - math.log(64)), abs=1e-4)
    term = A.AlignmentTerm(1, None, None, loss=A.dispersive_loss, weight=0.5)
    model = TinyBackbone()
    al = A.Alignment({"disp": term}).bind(model)
    loss, logs = al(_ctx(model, torch.randn(4, 4, 6), [1]), 0)
    assert "loss/disp" in logs and loss.requires_grad


def test_bad_terms_are_named():
    with pytest.raises(ValueError, match="unknown alignment loss"):
        A.AlignmentTerm(1, None, None, loss="cosin")
    with pytest.raises(TypeError, match="not an AlignmentTerm"):
        A.Alignment({"x": nn.Linear(2, 2)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="outside"):
        A.Alignment({"x": A.AlignmentTerm(9, None, None, loss=A.dispersive_loss)}).bind(TinyBackbone())
    with pytest.raises(ValueError, match="task's teacher"):
        A.Alignment({"x": A.AlignmentTerm(1, None, A.TeacherTarget(None))}).bind(TinyBackbone())
