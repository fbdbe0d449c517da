"""MeanFlow: the JVP target against finite differences, the r = t limit, the (t, r) sampler, one-step sampling."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from unirep.align import AlignmentTerm, ProjectorMLP, TeacherTarget
from unirep.flow import flow_matching_loss
from vision.encoders import TimmViTEncoder
from vision.meanflow import MeanFlow, meanflow_target, sample_meanflow
from vision.models.sit import create_sit
from vision.task import VisionFlowTask


def _sit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = create_sit("SiT-tiny/4", input_size=8, in_channels=1, num_classes=10, depth=2, interval_embed=True, **kw)
    with torch.no_grad():  # leave adaLN-Zero's identity: every output and modulation depends on t, h and z
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def test_jvp_target_equals_finite_differences_in_float64():
    model = _sit(torch.float64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64)
    y = torch.tensor([1, 4, 7])

    def u_fn(zz, tt, rr):
        return model(zz, tt, y, t_minus_r=tt - rr)

    u, u_tgt, aux = meanflow_target(u_fn, z, t, r, v)
    assert aux is None and not u_tgt.requires_grad
    assert torch.allclose(u, u_fn(z, t, r), atol=1e-12)
    # the total derivative along the trajectory (dz/dt = v, dt/dt = 1, dr/dt = 0) by central differences
    e = 1e-6
    du_dt = (u_fn(z + e * v, t + e, r) - u_fn(z - e * v, t - e, r)) / (2 * e)
    want = v - (t - r).reshape(-1, 1, 1, 1) * du_dt
    assert torch.allclose(u_tgt, want, atol=1e-7, rtol=1e-6)
    assert torch.equal(u_tgt[1], v[1])  # r = t: the target is the instantaneous velocity
    assert du_dt.abs().max() > 1e-2  # the check is not vacuous


def test_r_equal_t_reduces_to_flow_matching_and_the_adaptive_weight():
    model = _sit().train()
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    plain = MeanFlow(ratio_r_neq_t=0.0, adaptive_p=0.0)
    torch.manual_seed(3)
    step = plain.objective(x, lambda zz, tt, rr: model(zz, tt, y, t_minus_r=tt - rr))
    assert torch.equal(step.t, step.r)
    assert torch.allclose(step.u_tgt, step.eps - step.x)
    d = x[0].numel()  # the anchor sums over elements; flow matching averages
    fm = flow_matching_loss(step.u, step.x, step.eps)
    assert torch.allclose(step.loss, d * fm, rtol=1e-5)
    adaptive = MeanFlow(ratio_r_neq_t=0.0, adaptive_p=1.0, adaptive_eps=0.01)
    loss, sq = adaptive.loss(step.u, step.u_tgt)
    per_item = ((step.u - step.u_tgt) ** 2).sum((1, 2, 3))
    assert torch.allclose(sq, per_item, rtol=1e-5)
    assert torch.allclose(loss, (per_item / (per_item + 0.01)).mean(), rtol=1e-5)
    # the gradient of the adaptive loss is that of log(sq + c) (the weight is stop-gradient)
    u = step.u.detach().requires_grad_(True)
    adaptive.loss(u, step.u_tgt)[0].backward()
    u2 = step.u.detach().requires_grad_(True)
    torch.log(((u2 - step.u_tgt) ** 2).sum((1, 2, 3)) + 0.01).mean().backward()
    assert torch.allclose(u.grad, u2.grad, rtol=1e-4, atol=1e-8)


def test_time_sampler_follows_the_anchor():
    mf = MeanFlow()
    torch.manual_seed(0)
    t, r = mf.sample_times(40000)
    assert (t >= r).all() and (t > 0).all() and (t < 1).all()
    assert int((t == r).sum()) == 30000 and torch.equal(t[:30000], r[:30000])  # int(0.75 B) items with r = t
    # t = sigmoid(max of two N(-0.4, 1)), r = sigmoid(min): E[max] = mu + 1 / sqrt(pi)
    lt, lr = torch.logit(t[30000:]), torch.logit(r[30000:])
    assert abs(lt.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.03
    assert abs(lr.mean().item() - (-0.4 - 1 / math.sqrt(math.pi))) < 0.03
    with pytest.raises(ValueError, match="ratio_r_neq_t"):
        MeanFlow(ratio_r_neq_t=1.5)


def test_training_time_guidance_formula():
    mf = MeanFlow(omega=1.0, kappa=0.5, guidance_interval=(0.0, 0.8))
    v = torch.ones(3, 2)
    t = torch.tensor([0.5, 0.5, 0.9])

    def v_fn(z, tt, conditional):
        return torch.full_like(z, 3.0 if conditional else 2.0)

    v_g = mf.guided_velocity(v, torch.zeros(3, 2), t, torch.tensor([False, True, False]), v_fn)
    # omega v + (1 - omega - kappa) v_uncond + kappa v_cond = 1 - 0.5 * 2 + 0.5 * 3 = 1.5; dropped label / outside: v
    assert torch.allclose(v_g, torch.tensor([[1.5, 1.5], [1.0, 1.0], [1.0, 1.0]]))


def test_one_step_sampling_shape_and_nfe():
    model = _sit()
    task = VisionFlowTask(model, meanflow=MeanFlow(), sampler="meanflow", sample_steps=1, eval_batch=16)
    calls = []
    model.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    samples, labels = task.generate(12, seed=0)
    assert samples.shape == (12, 1, 8, 8) and calls == [12]  # one network evaluation per batch
    # z_0 = z_1 - u(z_1, r=0, t=1)
    z1 = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        u = model(z1.reshape(12, 1, 8, 8), torch.ones(12), labels, t_minus_r=torch.ones(12))
    assert torch.allclose(samples, z1.reshape(12, 1, 8, 8) - u, atol=1e-5)
    calls.clear()
    task.generate(12, seed=0, steps=2)
    assert calls == [12, 12]
    calls.clear()
    task.generate(12, seed=0, cfg_scale=2.0)
    assert calls == [24]  # guided: one call on the doubled batch
    # the sampler itself: a constant average velocity moves the state by (t - r) c per step, c in total
    out = sample_meanflow(lambda z, t, r: torch.full_like(z, 0.5), torch.zeros(2, 3), steps=4)
    assert torch.allclose(out, torch.full((2, 3), -0.5))


def test_meanflow_task_trains_with_repa_and_rejects_one_time_models():
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=2, allow_random_init=True)
    model = _sit().train()
    repa = AlignmentTerm(1, functools.partial(ProjectorMLP, hidden_dim=16), TeacherTarget(), "neg_cosine", 0.5)
    task = VisionFlowTask(model, meanflow=MeanFlow(kappa=0.5), align={"repa": repa}, teacher=teacher)
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.randint(0, 10, (4,))}
    out = task(batch, step=0)
    assert {"loss/flow", "loss/repa", "loss/v", "align/repa/cos"} <= set(out)
    out["loss"].backward()
    assert model.h_embedder.mlp[0].weight.grad.abs().sum() > 0  # the interval embedding learns
    assert repa.projector.net[0].weight.grad.abs().sum() > 0
    one_time = create_sit("SiT-tiny/4", input_size=8, in_channels=1, num_classes=10, depth=2)
    with pytest.raises(ValueError, match="interval_embed"):
        VisionFlowTask(one_time, meanflow=MeanFlow())
    with pytest.raises(ValueError, match="interval_embed=True"):
        one_time(batch["x"], torch.rand(4), batch["y"], t_minus_r=torch.zeros(4))
    with pytest.raises(ValueError, match="task.meanflow"):
        VisionFlowTask(one_time, sampler="meanflow")
