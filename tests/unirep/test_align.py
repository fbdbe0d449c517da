"""unirep.align: losses against hand values and direct loops, the Aligner, schedules, EMA teacher, resampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unirep import align as A
from unirep.tokens import TokenSet


def _ragged(d: int = 5, counts: tuple[int, ...] = (3, 1, 4), seed: int = 0) -> tuple[TokenSet, TokenSet]:
    """Two token sets with the same tokens and different token counts per item (a molecule-like batch)."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    x = torch.randn(len(batch), d, generator=g, dtype=torch.float64)
    y = torch.randn(len(batch), d, generator=g, dtype=torch.float64)
    return TokenSet(x, batch), TokenSet(y, batch)


def _items(ts: TokenSet) -> list[torch.Tensor]:
    return [ts.x[ts.batch == i] for i in range(ts.num_items)]


# -- projector ------------------------------------------------------------------------------------------------
def test_projector_is_repa_shape_and_acts_per_token():
    p = A.ProjectorMLP(16, 8, hidden_dim=32)
    kinds = [type(m) for m in p.net]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert [m.out_features for m in p.net if isinstance(m, nn.Linear)] == [32, 32, 8]
    ts, _ = _ragged(d=16)
    ts = ts.to(torch.float32)
    out = p(ts)
    assert isinstance(out, TokenSet) and out.x.shape == (8, 8) and torch.equal(out.batch, ts.batch)
    # per token: the output of one token does not depend on the others
    assert torch.allclose(p(ts.x[:1]), out.x[:1], atol=1e-6)
    assert len(A.ProjectorMLP(4, 2, num_layers=1).net) == 1


# -- losses ---------------------------------------------------------------------------------------------------
def test_neg_cosine_hand_values():
    # item 0: two tokens with cos 1 and cos 0; item 1: one token with cos -1/sqrt(2)
    pred = TokenSet(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), torch.tensor([0, 0, 1]))
    targ = TokenSet(torch.tensor([[3.0, 0.0], [5.0, 0.0], [-1.0, 1.0]]), torch.tensor([0, 0, 1]))
    expected = -0.5 * ((1.0 + 0.0) / 2 + (-1 / math.sqrt(2)))  # per item, then over items
    assert A.neg_cosine(pred, targ).item() == pytest.approx(expected, abs=1e-6)


def test_neg_cosine_uniform_equals_repa_mean_and_float32_in_half():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    repa = -(F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1).mean()
    assert A.neg_cosine(x, y).item() == pytest.approx(repa.item(), abs=1e-6)
    # large-norm half tokens: squaring in fp16 overflows; the loss computes in float32
    big = (x * 300).half()
    out = A.neg_cosine(big, y.half())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(repa.item(), abs=2e-3)


def test_vf_loss_matches_direct_loop():
    pred, targ = _ragged(d=4, counts=(3, 1, 5), seed=2)
    m1, m2 = 0.5, 0.25
    mcos, mdms = [], []
    for zp, zt in zip(_items(pred), _items(targ), strict=True):
        n = zp.shape[0]
        mcos.append(sum(max(0.0, 1 - m1 - float(F.cosine_similarity(zp[i], zt[i], dim=0))) for i in range(n)) / n)
        acc = 0.0
        for i in range(n):
            for j in range(n):
                cp = float(F.cosine_similarity(zp[i], zp[j], dim=0))
                ct = float(F.cosine_similarity(zt[i], zt[j], dim=0))
                acc += max(0.0, abs(cp - ct) - m2)
        mdms.append(acc / n**2)
    parts = A.vf_loss_parts(pred, targ, m1=m1, m2=m2)
    assert parts["mcos"].item() == pytest.approx(sum(mcos) / 3, abs=1e-5)
    assert parts["mdms"].item() == pytest.approx(sum(mdms) / 3, abs=1e-5)
    total = A.vf_loss(pred, targ, w_mcos=2.0, w_mdms=0.5).item()
    assert total == pytest.approx(2.0 * sum(mcos) / 3 + 0.5 * sum(mdms) / 3, abs=1e-5)
    assert A.vf_loss(pred, pred).item() == pytest.approx(max(0.0, 1 - m1 - 1.0), abs=1e-6)  # = 0


def test_nt_xent_matches_cross_entropy_definition():
    pred, targ = _ragged(d=6, counts=(2, 3), seed=3)
    tau = 0.2
    zp, zt = F.normalize(pred.x.float(), dim=-1), F.normalize(targ.x.float(), dim=-1)
    t = zp.shape[0]
    per = []
    for i in range(t):
        row = torch.tensor([float(zp[i] @ zt[j]) / tau for j in range(t)])
        col = torch.tensor([float(zt[i] @ zp[j]) / tau for j in range(t)])
        per.append(0.5 * (torch.logsumexp(row, 0) - row[i] + torch.logsumexp(col, 0) - col[i]))
    per = torch.stack(per)
    ref = 0.5 * (per[:2].mean() + per[2:].mean())
    assert A.nt_xent(pred, targ, tau=tau).item() == pytest.approx(ref.item(), abs=1e-5)
    # negatives only within the item: item 0 has 2 candidates, item 1 has 3
    per_item = []
    for lo, hi in ((0, 2), (2, 5)):
        logits = zp[lo:hi] @ zt[lo:hi].T / tau
        lab = torch.arange(hi - lo)
        per_item.append(0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)))
    ref_item = sum(per_item) / 2
    assert A.nt_xent(pred, targ, tau=tau, negatives="item").item() == pytest.approx(ref_item.item(), abs=1e-5)


def test_mse_and_smooth_l1_per_item_average():
    pred, targ = _ragged(counts=(1, 3), seed=4)
    d2 = (pred.x - targ.x).pow(2).mean(-1)
    assert A.mse(pred, targ).item() == pytest.approx(0.5 * (d2[0] + d2[1:].mean()).item(), abs=1e-6)
    diff = (pred.x - targ.x).abs()
    huber = torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean(-1)
    assert A.smooth_l1(pred, targ).item() == pytest.approx(0.5 * (huber[0] + huber[1:].mean()).item(), abs=1e-6)


def test_losses_reject_mismatched_tokens():
    pred, targ = _ragged(counts=(3, 1, 4))
    other = TokenSet(targ.x[:-1], targ.batch[:-1])
    with pytest.raises(ValueError, match="same tokens"):
        A.neg_cosine(pred, other)
    with pytest.raises(ValueError, match="out_dim"):
        A.neg_cosine(pred, targ.with_x(targ.x[:, :3]))


# -- aligner and schedules ------------------------------------------------------------------------------------
def test_schedules():
    assert A.ConstantWeight(0.5)(10**6) == 0.5
    s = A.StopAtStep(0.5, stop_step=100)
    assert (s(0), s(99), s(100), s(5000)) == (0.5, 0.5, 0.0, 0.0)
    d = A.LinearDecay(1.0, start=10, end=20)
    assert (d(0), d(10), d(15), d(20), d(30)) == (1.0, 1.0, 0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="end > start"):
        A.LinearDecay(1.0, 5, 5)


def test_aligner_outputs_weights_and_gradients():
    torch.manual_seed(0)
    student, teacher = _ragged(d=6, counts=(4, 2), seed=5)
    student = student.to(torch.float32).with_x(student.x.float().requires_grad_(True))
    teacher = teacher.to(torch.float32).with_x(teacher.x.float().requires_grad_(True))
    al = A.Aligner(A.ProjectorMLP(6, 6, hidden_dim=16), loss="neg_cosine", schedule=A.StopAtStep(0.5, 3))
    out = al(student, teacher, step=0)
    proj = al.projector(student.x)
    raw = A.neg_cosine(student.with_x(proj), teacher)
    assert out["raw"].item() == pytest.approx(raw.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * raw.item(), abs=1e-6)
    assert out["cos"].item() == pytest.approx(-raw.item(), abs=1e-6) and not out["cos"].requires_grad
    assert out["weight"] == 0.5
    out["loss"].backward()
    for name, prm in al.projector.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    assert student.x.grad is not None and teacher.x.grad is None  # the target is detached
    assert al(student, teacher, step=3)["loss"].item() == 0.0


def test_aligner_loss_by_name_or_callable_and_errors():
    student, teacher = _ragged(d=4)
    assert A.Aligner(None, loss="mse", weight=2.0)(student, teacher, 0)["loss"].item() == pytest.approx(
        2.0 * A.mse(student, teacher).item()
    )
    custom = A.Aligner(None, loss=lambda p, t: (p.x - t.x).abs().mean(), weight=1.0)
    assert custom(student, teacher, 0)["raw"].item() == pytest.approx((student.x - teacher.x).abs().mean().item())
    with pytest.raises(ValueError, match="unknown alignment loss"):
        A.Aligner(None, loss="cosine_typo")
    fewer = TokenSet(teacher.x[:-2], teacher.batch[:-2])
    with pytest.raises(ValueError, match="same tokens"):
        A.Aligner(None)(student, fewer, 0)


# -- dispersive loss ------------------------------------------------------------------------------------------
def test_dispersive_loss_matches_pairwise_definition():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 2, generator=g)  # 4 items, 3 tokens, 2 dims
    tau = 0.5
    z = x.reshape(4, -1)
    d = z.shape[1]  # the official code divides the squared distance by the flattened dimension
    terms = [math.exp(-float(((z[i] - z[j]) ** 2).sum()) / (d * tau)) for i in range(4) for j in range(4)]
    assert A.dispersive_loss(x, tau=tau).item() == pytest.approx(math.log(sum(terms) / 16), abs=1e-5)
    zc = F.normalize(z, dim=-1)
    terms_c = [math.exp(float(zc[i] @ zc[j]) / tau) for i in range(4) for j in range(4)]
    assert A.dispersive_loss(x, tau=tau, variant="cosine").item() == pytest.approx(
        math.log(sum(terms_c) / 16), abs=1e-5
    )
    # identical items: every distance is 0, the loss is its maximum log(1) = 0; spreading them lowers it
    same = x[:1].expand(4, 3, 2)
    assert A.dispersive_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    assert A.dispersive_loss(3 * x).item() < A.dispersive_loss(x).item() < 0
    ragged, _ = _ragged(counts=(2, 3))
    with pytest.raises(ValueError, match="'mean'"):
        A.dispersive_loss(ragged)
    pooled = ragged.pool("mean").float()
    ref = math.log(
        sum(
            math.exp(-float(((pooled[i] - pooled[j]) ** 2).sum()) / (pooled.shape[1] * tau))
            for i in range(2)
            for j in range(2)
        )
        / 4
    )
    assert A.dispersive_loss(ragged, tau=tau, reduce="mean").item() == pytest.approx(ref, abs=1e-5)


# -- target kinds ---------------------------------------------------------------------------------------------
def test_ema_teacher_update_formula_and_frozen():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = A.EMATeacher(student, decay=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # changes BatchNorm running statistics
    teacher.update(student)
    for name, p in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(teacher.module.get_parameter(name), expected, atol=1e-6), name
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    teacher.train()
    assert not teacher.module.training
    out = teacher(torch.randn(2, 3))
    assert not out.requires_grad


def test_detach_target_stops_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    ts = TokenSet(x, torch.tensor([0, 0, 1, 1]))
    assert not A.detach_target(ts).x.requires_grad and not A.detach_target(x).requires_grad


# -- grid resampling ------------------------------------------------------------------------------------------
def test_resample_grid_identity_constant_and_linear_field():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 3, generator=g)
    assert torch.equal(A.resample_grid(x, 16), x)
    const = torch.full((1, 16, 2), 4.0)
    assert torch.allclose(A.resample_grid(const, 64), torch.full((1, 64, 2), 4.0))
    # 2x2 -> 4x4 with half-pixel centres: interior samples interpolate, edges clamp (align_corners=False)
    small = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 4, 1)
    up = A.resample_grid(small, 16).reshape(4, 4)
    assert up[1, 1].item() == pytest.approx(0.75) and up[0, 0].item() == pytest.approx(0.0)
    assert up[1, 2].item() == pytest.approx(1.25) and up[3, 3].item() == pytest.approx(3.0)
    # downsampling an even-sized grid by 2 without antialias averages each 2x2 block
    down = A.resample_grid(x, 4).reshape(2, 2, 2, 3)
    blocks = x.reshape(2, 2, 2, 2, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(down, blocks, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        A.resample_grid(x, 10)


def test_resample_tokens_tokenset():
    x = torch.randn(3, 16, 2)
    ts = TokenSet.from_dense(x)
    out = A.resample_tokens(ts, 4)
    assert out.num_items == 3 and out.x.shape == (12, 2)
    assert torch.allclose(out.to_dense()[0], A.resample_grid(x, 4))
    assert A.resample_tokens(ts, 16) is ts


def test_losses_run_in_float32_under_autocast():
    g = torch.Generator().manual_seed(8)
    pred, targ = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    ref = (A.vf_loss(pred, targ), A.nt_xent(pred, targ), A.dispersive_loss(pred), A.neg_cosine(pred, targ))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = (A.vf_loss(pred, targ), A.nt_xent(pred, targ), A.dispersive_loss(pred), A.neg_cosine(pred, targ))
    for r, o in zip(ref, out, strict=True):
        assert o.dtype == torch.float32 and o.item() == pytest.approx(r.item(), abs=1e-6)


@pytest.mark.parametrize(
    "loss",
    [A.neg_cosine, A.vf_loss, A.nt_xent, lambda p, t: A.nt_xent(p, t, negatives="item"), A.mse, A.smooth_l1],
)
def test_losses_give_finite_gradients_on_ragged_batches(loss):
    # padded slots (items of 1 and 4 tokens share a [B, 4] dense layout) must not leak inf/NaN into gradients
    pred, targ = _ragged(d=3, counts=(1, 4, 2), seed=9)
    x = pred.x.float().requires_grad_(True)
    out = loss(pred.with_x(x), targ.to(torch.float32))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
