"""JiT-style x-prediction in VisionFlowTask: the loss and the velocity conversion against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unirep.flow import FlowMatching, FlowSample, FlowStep
from unirep.tokens import TokenSet
from vision.models.sit import create_sit
from vision.task import VisionFlowTask

SHAPE = (1, 2, 2)  # C, H, W


class GaussianOracle(nn.Module):
    """The exact posterior mean E[x | x_t] for data x ~ N(m, s^2 I), x_t = (1 - t) x + t eps (or its velocity)."""

    def __init__(self, m: float, s: float, output: str = "x0") -> None:
        super().__init__()
        self.m, self.s, self.output = m, s, output
        self.dummy = nn.Parameter(torch.zeros(()))  # a device and dtype for the task
        self.in_channels, self.input_size, self.num_classes = SHAPE[0], SHAPE[1], 0
        self.num_layers = 1

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(-1, 1, 1, 1).to(x_t.dtype)
        var_t = (1 - tb) ** 2 * self.s**2 + tb**2
        return self.m + (1 - tb) * self.s**2 / var_t * (x_t - (1 - tb) * self.m)

    def forward(self, x_t, t, y=None, **kw):
        return self.posterior_mean(x_t, t) + 0 * self.dummy

    def forward_intermediates(self, x_t, t, y=None, indices=(), **kw):
        return self(x_t, t), [TokenSet.from_dense(x_t.flatten(2).transpose(1, 2)) for _ in indices]


def _gaussian_velocity(x_t: torch.Tensor, t: float, m: float, s: float) -> torch.Tensor:
    """Velocity of the Gaussian path N((1 - t) m, sigma_t^2): d mean/dt + (d sigma_t/dt / sigma_t) (x - mean)."""
    var = (1 - t) ** 2 * s**2 + t**2
    dvar_half = -(1 - t) * s**2 + t  # sigma_t * d sigma_t / dt
    return -m + dvar_half / var * (x_t - (1 - t) * m)


def _task(model, **kw):
    flow = FlowMatching(time_dist="logit_normal", mean=0.8, std=0.8, clamp=0.05)
    return VisionFlowTask(model, flow=flow, prediction="x0", sampler="heun", sample_steps=50, **kw)


def test_oracle_x_prediction_converts_to_the_exact_gaussian_velocity():
    m, s = 0.7, 0.4
    task = _task(GaussianOracle(m, s))
    vel = task._as_velocity(lambda state, t: task.model(state.reshape(-1, *SHAPE), t).flatten(1))
    x_t = torch.randn(5, 4, dtype=torch.float64)
    for t in (0.9, 0.5, 0.1):
        got = vel(x_t, torch.full((5,), t, dtype=torch.float64))
        assert torch.allclose(got, _gaussian_velocity(x_t, t, m, s), atol=1e-12)


def test_oracle_x_prediction_samples_the_gaussian():
    m, s = 0.7, 0.4
    task = _task(GaussianOracle(m, s))
    samples, _ = task.generate(4000, seed=0, batch_size=4000)
    assert samples.shape == (4000, *SHAPE)
    assert abs(samples.mean().item() - m) < 0.02 and abs(samples.std().item() - s) < 0.02


def test_x_prediction_loss_is_jit_loss_and_zero_for_the_oracle():
    """JiT: mean over items of mean ((x_pred - x) / max(t, t_eps))^2; the exact x_pred gives 0 at every t."""
    task = _task(GaussianOracle(0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *SHAPE, generator=g)
    eps = torch.randn(6, *SHAPE, generator=g)
    t = torch.tensor([0.001, 0.02, 0.049, 0.2, 0.6, 0.99])  # three below the clamp
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * eps
    sample = FlowSample(x, eps, t, t, x_t, eps - x, None, 6)
    x_pred = x + 0.1 * torch.randn(6, *SHAPE, generator=g)
    loss = task._velocity_loss(FlowStep(loss=torch.tensor(0.0), pred=x_pred, aux=None, sample=sample))
    by_hand = sum(((x_pred[i] - x[i]) / max(float(t[i]), 0.05)).square().mean() for i in range(6)) / 6
    assert math.isclose(loss.item(), by_hand.item(), rel_tol=1e-5)
    exact = task._velocity_loss(FlowStep(loss=torch.tensor(0.0), pred=x.clone(), aux=None, sample=sample))
    assert exact.item() == 0.0


def test_point_mass_oracle_trains_with_zero_flow_loss():
    """Data all equal to x*: E[x | x_t] = x*, so the oracle's training loss vanishes exactly (whatever t is drawn)."""

    class PointOracle(GaussianOracle):
        def forward(self, x_t, t, y=None, **kw):
            return torch.full_like(x_t, 0.3) + 0 * self.dummy

    task = _task(PointOracle(0.3, 0.0))
    out = task({"x": torch.full((64, *SHAPE), 0.3)}, step=0)
    assert out["loss"].item() == 0.0
    velocity = VisionFlowTask(PointOracle(0.3, 0.0), flow=FlowMatching(clamp=0.05))
    assert velocity({"x": torch.full((64, *SHAPE), 0.3)}, step=0)["loss"].item() > 0  # as a velocity it is wrong


def test_prediction_option_checks_and_sit_trains():
    model = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="task.prediction='bogus'"):
        VisionFlowTask(model, prediction="bogus")
    with pytest.raises(ValueError, match="task.flow.prediction='eps'"):
        VisionFlowTask(model, prediction="x0", flow=FlowMatching(prediction="eps"))
    assert VisionFlowTask(model, prediction="x").prediction == "x0"
    assert VisionFlowTask(model, flow=FlowMatching(prediction="eps")).prediction == "eps"
    task = VisionFlowTask(model, prediction="x0", flow=FlowMatching(clamp=0.05), sample_steps=2)
    out = task({"x": torch.randn(4, 1, 16, 16), "y": torch.randint(0, 10, (4,))}, step=0)
    out["loss"].backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    samples, labels = task.generate(4, seed=0)
    assert samples.shape == (4, 1, 16, 16) and torch.isfinite(samples).all()
