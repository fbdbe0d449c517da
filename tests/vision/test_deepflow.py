"""DeepFlow against its definition (ByteDance-Seed/DeepFlow ``loss.py``, ``models/``): every head regresses the flow
target eps - x, the acceleration loss moves x_{t_k} to t = 0 with a stopped-gradient velocity, branch times differ by
at most beta in one direction, gradients reach every head, and sampling reads only the final head."""

from __future__ import annotations

import pytest
import torch

from unirep.flow import FlowMatching, FlowSample
from vision.models.deepflow import DeepFlow, VeRABlock, deepflow_tiny, deepflow_xl2
from vision.task import VisionFlowTask


def _model(**kw) -> DeepFlow:
    torch.manual_seed(0)
    m = deepflow_tiny(input_size=8, patch_size=2, in_channels=2, num_classes=3, acc_hidden_dim=16, **kw)
    for p in m.parameters():  # lift the zero inits so that every head and modulation carries signal
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return m


def _draw(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(n, 2, 8, 8, generator=g), torch.randn(n, 2, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    return x, eps, t


def test_deep_supervision_targets_are_the_flow_targets():
    m = _model()
    m.train()
    x, eps, t = _draw()
    y = torch.tensor([0, 1, 2, 0])
    keep = torch.zeros(4, dtype=torch.bool)  # no label dropout
    fm = FlowMatching()
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x + tt * eps  # written out: the project's interpolant, t = 1 noise
    sample = FlowSample(x, eps, t, t, x_t, eps - x, None, 4)
    torch.manual_seed(3)
    v_final, _ = m.forward_intermediates(sample.x_t, t, y, force_drop_ids=keep)
    times = m._train_pass["times"]
    losses = m.auxiliary_losses(sample)
    assert set(losses) == {"deep/2", "acc/2"} and m._train_pass is None
    vs, accs, _ = m.forward_branches(sample.x_t, times, y, force_drop_ids=keep)
    assert torch.allclose(vs[-1], v_final)
    # the intermediate head regresses eps - x (the linear path's velocity), weight 0.2
    deep, w = losses["deep/2"]
    assert w == 0.2 and torch.allclose(deep, (vs[0] - (eps - x)).square().mean(), atol=1e-6)
    # acceleration: x_{t_1} - t_1 v_1 + t_1^2 a_1 / 2 should land on the data; branch 1 sees the sampled t itself
    assert torch.equal(times[0], t)
    x_pred = (1 - tt) * x + tt * eps - tt * vs[0] + 0.5 * tt**2 * accs[0]
    acc, w = losses["acc/2"]
    assert w == 1.0 and torch.allclose(acc, (x_pred - x).square().mean(), atol=1e-6)
    # the final head is the task's flow loss: the same target
    assert fm.loss(v_final, sample.target).item() == pytest.approx((v_final - (eps - x)).square().mean().item())


def test_branch_times_step_by_at_most_beta_in_one_direction():
    m = _model()
    m.df_idxs, m.deep_weights = [1, 2], [0.2, 0.2]  # three branches (times only; no forward)
    t = torch.tensor([0.0, 0.003, 0.5, 0.998, 1.0])
    signs = set()
    for seed in range(20):
        torch.manual_seed(seed)
        ts = m.branch_times(t)
        assert len(ts) == 3 and torch.equal(ts[0], t)
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            d = b - a
            assert (d.abs() <= 0.01 + 1e-7).all() and ((b >= 0) & (b <= 1)).all()
            inner = d[(a > 0.02) & (a < 0.98)]
            signs.add(int(torch.sign(inner).sum().sign()))
            assert (torch.sign(inner) == torch.sign(inner[0])).all()  # one direction for the whole batch
    assert signs == {-1, 1}


def test_task_logs_and_adds_the_deep_losses_and_gradient_reaches_every_head():
    m = _model()
    task = VisionFlowTask(m)
    x = torch.rand(4, 2, 8, 8) * 2 - 1
    out = task({"x": x, "y": torch.tensor([0, 1, 2, 1])}, step=0)
    assert {"loss/flow", "loss/deep/2", "loss/acc/2"} <= set(out)
    total = out["loss/flow"] + 0.2 * out["loss/deep/2"] + 1.0 * out["loss/acc/2"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    for head in (m.inter_head, m.acc_head, m.final_layer, m.vera[0]):
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # the acceleration loss stops the velocity's gradient: without deep supervision the intermediate head learns nothing
    m.zero_grad()
    m.deep_weights = [0.0]
    task({"x": x, "y": torch.tensor([0, 1, 2, 1])}, step=0)["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.inter_head.parameters())
    assert m.acc_head.linear.weight.grad.abs().sum() > 0


def test_sampling_uses_the_final_head_with_zero_time_gaps():
    m = _model()
    m.eval()
    x, _, t = _draw(3)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        v = m(x, t, y)
        assert torch.allclose(v, m.forward_branches(x, [t, t], y)[0][-1])
        task = VisionFlowTask(m, sample_steps=3, eval_batch=3)
        s1, _ = task.generate(3, seed=0)
        for p in [*m.inter_head.parameters(), *m.acc_head.parameters()]:
            p.add_(torch.randn_like(p))  # intermediate and acceleration heads: not read at sampling
        assert torch.equal(m(x, t, y), v) and torch.equal(task.generate(3, seed=0)[0], s1)
        m.final_layer.linear.weight.add_(0.1)
        assert not torch.allclose(m(x, t, y), v)
    assert m._train_pass is None  # nothing is kept outside training


def test_vera_block_and_index_convention():
    torch.manual_seed(0)
    block = VeRABlock(16, 8, num_heads=2)
    h, xe, gap = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 32)
    acc, out = block(h, xe, gap)
    assert acc.shape == out.shape == (2, 5, 16) and torch.allclose(acc, block.acc_mlp(h))
    # cross-space attention: a residual on the normalised queries (the embedded noisy input)
    torch.nn.init.zeros_(block.cross_attn.out_proj.weight)
    torch.nn.init.zeros_(block.cross_attn.out_proj.bias)
    assert torch.allclose(block(h, xe, gap)[1], block.cross_norm(xe), atol=1e-6)
    # the feature at index df_idx is the VeRA output, the next branch's input
    m = _model()
    m.eval()
    seen = {}
    m.vera[0].register_forward_hook(lambda mod, args, res: seen.update(next=res[1]))  # returns None: output kept
    x, _, t = _draw(2)
    _, feats = m.forward_intermediates(x, t, torch.tensor([0, 1]), indices=[2])
    assert torch.equal(feats[0].x, seen["next"].reshape(-1, 64))
    with pytest.raises(ValueError, match="df_idxs"):
        _model(df_idxs=[4])
    with pytest.raises(ValueError, match="deep_weights"):
        _model(deep_weights=[0.2, 0.2])
    with torch.device("meta"):
        xl = deepflow_xl2(input_size=32, in_channels=4)
    assert (xl.depth, xl.hidden_size, xl.df_idxs, xl.deep_weights) == (24, 1152, [8, 16], [0.2, 0.2])
