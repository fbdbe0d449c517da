"""Tests for unirep.flow against closed forms.

The reference for the samplers is Gaussian data x ~ N(mu, Sigma): for x_t = (1 - t) x + t eps the marginal velocity
E[eps - x | x_t] is affine, v = -mu + A_t (x_t - (1 - t) mu) with A_t = (t I - (1 - t) Sigma) Cov_t^{-1},
Cov_t = (1 - t)^2 Sigma + t^2 I (the cross-covariance of eps - x and x_t is t I - (1 - t) Sigma). All A_t are
functions of Sigma, so the probability-flow map from t = 1 to t = 0 is x0 = mu + Sigma^{1/2} x1 exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unirep.flow import (
    FlowMatching,
    broadcast_time,
    cfg_batched,
    dimension_shift,
    eps_to_velocity,
    flow_matching_loss,
    guided_velocity,
    interpolate,
    pred_to_velocity,
    sample_ode,
    sample_sde,
    sample_time,
    shift_from_data_time,
    shift_time,
    time_grid,
    unshift_time,
    velocity_target,
    velocity_to_eps,
    velocity_to_score,
    velocity_to_x0,
    x0_to_velocity,
)

D = torch.float64


def _gaussian(dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=D)
    a = torch.randn(dim, dim, generator=g, dtype=D)
    sigma = 0.5 * a @ a.T / dim + 0.3 * torch.eye(dim, dtype=D)  # well-conditioned SPD
    return mu, sigma


def _gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """Exact marginal velocity for x ~ N(mu, Sigma) under x_t = (1 - t) x + t eps; x_t [B, d], t [B]."""
    eye = torch.eye(mu.shape[0], dtype=D)

    def v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(D).expand(x_t.shape[0])[:, None, None]  # [B, 1, 1]
        cov = (1 - t) ** 2 * sigma + t**2 * eye  # [B, d, d]
        a_t = (t * eye - (1 - t) * sigma) @ torch.linalg.inv(cov)  # [B, d, d]
        centred = x_t.to(D) - (1 - t[:, :, 0]) * mu  # [B, d]
        return (-mu + (a_t @ centred[:, :, None])[:, :, 0]).to(x_t.dtype)

    return v


def _sqrtm(sigma: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(sigma)
    return evecs @ torch.diag(evals.sqrt()) @ evecs.T


# ------------------------------------------------------------------------------------------------------------
# interpolant, conversions, broadcasting
# ------------------------------------------------------------------------------------------------------------


def test_interpolant_endpoints_and_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=D)
    eps = torch.randn(5, 2, 3, 3, generator=g, dtype=D)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=D)
    x_t = interpolate(x, eps, t)
    torch.testing.assert_close(x_t[0], x[0])
    torch.testing.assert_close(x_t[-1], eps[-1])
    torch.testing.assert_close(x_t[2], 0.5 * (x[2] + eps[2]))
    v = velocity_target(x, eps)
    # the velocity is the time derivative of the interpolant (finite difference, exact for a linear path)
    torch.testing.assert_close((interpolate(x, eps, t + 1e-3) - x_t) / 1e-3, v)
    torch.testing.assert_close(velocity_to_x0(v, x_t, t), x)
    torch.testing.assert_close(velocity_to_eps(v, x_t, t), eps)
    inner = slice(1, 4)  # away from the clamped endpoints
    torch.testing.assert_close(x0_to_velocity(x[inner], x_t[inner], t[inner]), v[inner])
    torch.testing.assert_close(eps_to_velocity(eps[inner], x_t[inner], t[inner]), v[inner])
    torch.testing.assert_close(pred_to_velocity(v, "velocity", x_t, t), v)
    torch.testing.assert_close(pred_to_velocity(x[inner], "x0", x_t[inner], t[inner]), v[inner])
    torch.testing.assert_close(pred_to_velocity(eps[inner], "eps", x_t[inner], t[inner]), v[inner])
    # Tweedie for a point mass at x: the score of N((1-t) x, t^2 I) at x_t is -(x_t - (1-t) x) / t^2 = -eps / t
    torch.testing.assert_close(
        velocity_to_score(v[inner], x_t[inner], t[inner]), -eps[inner] / t[inner, None, None, None]
    )
    with pytest.raises(ValueError, match="prediction kind"):
        pred_to_velocity(v, "score", x_t, t)


def test_conversion_clamp_keeps_endpoints_finite():
    x = torch.randn(2, 4, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    assert torch.isfinite(x0_to_velocity(x, x, t)).all()
    assert torch.isfinite(eps_to_velocity(x, x, t)).all()


def test_broadcast_time_shapes_and_errors():
    x = torch.zeros(4, 2, 5, 5)
    assert broadcast_time(torch.rand(4), x).shape == (4, 1, 1, 1)
    assert broadcast_time(torch.rand(1), x).shape == (1, 1, 1, 1)
    assert broadcast_time(0.3, x).shape == (1, 1, 1, 1)
    atoms = torch.zeros(7, 3)
    assert broadcast_time(torch.rand(7), atoms).shape == (7, 1)
    with pytest.raises(ValueError, match="t\\[batch\\]"):
        broadcast_time(torch.rand(2), atoms)  # per-graph times must be expanded per atom by the caller
    assert broadcast_time(torch.rand(3, dtype=D), torch.zeros(3, 2)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# time sampling and shift
# ------------------------------------------------------------------------------------------------------------


def test_logit_normal_quantiles_and_mean():
    mean, std, n = 0.4, 1.3, 200_000
    t = sample_time(n, "logit_normal", mean, std, generator=torch.Generator().manual_seed(0), dtype=D)
    assert t.shape == (n,) and ((t > 0) & (t < 1)).all()
    # quantiles of sigmoid(N(mean, std^2)) are sigmoid of the normal quantiles (monotone map)
    for q, z in [(0.1, -1.2815515655446004), (0.5, 0.0), (0.9, 1.2815515655446004)]:
        expected = 1 / (1 + math.exp(-(mean + std * z)))
        assert abs(torch.quantile(t, q).item() - expected) < 4e-3
    # mean by quadrature of sigmoid(mean + std z) against the standard normal density
    z = np.linspace(-10, 10, 20001)
    density = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    expected_mean = np.trapezoid(density / (1 + np.exp(-(mean + std * z))), z)
    # standard error of the mean <= 0.5 / sqrt(n) ~ 1.1e-3
    assert abs(t.mean().item() - expected_mean) < 5e-3
    u = sample_time(n, "uniform", generator=torch.Generator().manual_seed(0))
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean().item() - 0.5) < 5e-3
    with pytest.raises(ValueError, match="unknown kind"):
        sample_time(3, "beta")


def test_sample_time_is_deterministic_under_a_seed():
    a = sample_time(16, "logit_normal", generator=torch.Generator().manual_seed(3))
    b = sample_time(16, "logit_normal", generator=torch.Generator().manual_seed(3))
    c = sample_time(16, "logit_normal", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shift_time_properties():
    t = torch.linspace(0, 1, 101, dtype=D)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    for s in (0.3, 2.0, 6.93):
        ts = shift_time(t, s)
        assert ts[0] == 0 and abs(ts[-1].item() - 1) < 1e-15
        assert (ts[1:] > ts[:-1]).all()
        torch.testing.assert_close(unshift_time(ts, s), t)
        torch.testing.assert_close(shift_time(ts, 1 / s), t)
        # slope s at t = 0 (near the data the shifted time runs s times faster)
        assert abs(shift_time(1e-8, s) / 1e-8 - s) < 1e-6 * s
    assert (shift_time(t[1:-1], 3.0) > t[1:-1]).all()  # s > 1 pushes times towards noise
    # RAE: DINOv2-B latents 768 x 16 x 16
    assert abs(dimension_shift(768 * 16 * 16) - math.sqrt(48)) < 1e-12 and dimension_shift(4096) == 1.0
    # data-time shift a (tau = 1 - t is data) is the noise-time shift 1/a
    tau = torch.linspace(0, 1, 11, dtype=D)
    a = 0.3
    torch.testing.assert_close(1 - shift_time(1 - tau, shift_from_data_time(a)), a * tau / (1 + (a - 1) * tau))
    assert abs(shift_from_data_time(0.3) - 3.333333) < 1e-5
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_time_grid_matches_repa_and_ends_at_t_end():
    torch.testing.assert_close(time_grid(4), torch.linspace(1, 0, 5, dtype=D))
    g = time_grid(10, t_end=0.04, shift=3.0)
    assert g.dtype == D and g[0] == 1 and g[-1] == 0.04 and (g[1:] < g[:-1]).all()
    torch.testing.assert_close(unshift_time(g, 3.0), torch.linspace(1, unshift_time(0.04, 3.0), 11, dtype=D))


# ------------------------------------------------------------------------------------------------------------
# loss and FlowMatching
# ------------------------------------------------------------------------------------------------------------


def test_flow_matching_loss_definition():
    g = torch.Generator().manual_seed(2)
    x, eps, pred = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(3))
    per_item = ((pred - (eps - x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(flow_matching_loss(pred, x, eps), per_item.mean())
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    torch.testing.assert_close(flow_matching_loss(pred, x, eps, weight=w), (w * per_item).mean())
    torch.testing.assert_close(flow_matching_loss(pred, x, eps, reduce_dims=(1, 2, 3)), per_item.mean())
    assert flow_matching_loss(eps - x, x, eps).item() == 0.0
    assert flow_matching_loss(pred.double(), x.double(), eps.double()).dtype == D  # no silent downcast
    assert flow_matching_loss(pred.bfloat16(), x.bfloat16(), eps.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(pred[:, :2], x, eps)
    # graph batch: 2 molecules of 3 and 1 atoms; each molecule counts once whatever its size
    xa, ea, pa = (torch.randn(4, 3, generator=g) for _ in range(3))
    batch = torch.tensor([0, 0, 0, 1])
    per_atom = ((pa - (ea - xa)) ** 2).mean(1)
    per_mol = torch.stack([per_atom[:3].mean(), per_atom[3]])
    torch.testing.assert_close(flow_matching_loss(pa, xa, ea, batch=batch), per_mol.mean())
    wm = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(flow_matching_loss(pa, xa, ea, weight=wm, batch=batch), (wm * per_mol).mean())


def test_flow_matching_training_pair_and_loss():
    fm = FlowMatching("logit_normal", mean=0.0, std=1.0, shift=3.0)
    x = torch.randn(4096, 2, dtype=D)
    x_t, t, target = fm.training_pair(x, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and x_t.shape == x.shape
    # x_t = (1 - t) x + t eps with target = eps - x  <=>  x = x_t - t target
    torch.testing.assert_close(x_t - t[:, None] * target, x)
    # median of a shifted logit-normal(0, 1) is shift_time(sigmoid(0)) = 3/4 for s = 3
    assert abs(t.median().item() - shift_time(0.5, 3.0)) < 0.02
    again = fm.training_pair(x, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, target), again, strict=True))
    assert fm.loss(target, target).item() == 0.0
    # an x0-predicting network that outputs the data exactly has zero velocity loss
    fm_x0 = FlowMatching(prediction="x0")
    x_t, t, target = fm_x0.training_pair(x[:64], generator=torch.Generator().manual_seed(1))
    keep = t > 0.01
    assert fm_x0.loss(x[:64][keep], target[keep], x_t[keep], t[keep]).item() < 1e-20
    with pytest.raises(ValueError, match="needs x_t and t"):
        fm_x0.loss(x[:64], target)
    with pytest.raises(ValueError, match="time_dist"):
        FlowMatching("lognormal")
    with pytest.raises(ValueError, match="prediction"):
        FlowMatching(prediction="score")


# ------------------------------------------------------------------------------------------------------------
# ODE sampler
# ------------------------------------------------------------------------------------------------------------


def _ode_error(method: str, steps: int, shift: float = 1.0) -> float:
    mu, sigma = _gaussian()
    x1 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    exact = mu + x1 @ _sqrtm(sigma)  # Sigma^{1/2} is symmetric
    out = sample_ode(_gaussian_velocity(mu, sigma), x1, steps=steps, method=method, shift=shift)
    return (out - exact).abs().mean().item()


def test_ode_convergence_order_euler_and_heun():
    euler = [_ode_error("euler", n) for n in (8, 16, 32)]
    heun = [_ode_error("heun", n) for n in (8, 16, 32)]
    euler_order = [math.log2(euler[i] / euler[i + 1]) for i in range(2)]
    heun_order = [math.log2(heun[i] / heun[i + 1]) for i in range(2)]
    assert all(0.8 < p < 1.2 for p in euler_order), euler_order
    assert all(1.7 < p < 2.3 for p in heun_order), heun_order
    assert heun[-1] < 0.1 * euler[-1]
    # the shifted grid (coarser near the data for s > 1) keeps second order
    shifted = [_ode_error("heun", n, shift=3.0) for n in (16, 32)]
    assert 1.7 < math.log2(shifted[0] / shifted[1]) < 2.3, shifted


def test_ode_maps_noise_to_data_moments():
    mu, sigma = _gaussian(dim=2, seed=5)
    x1 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    out = sample_ode(_gaussian_velocity(mu, sigma), x1, steps=64, method="heun")
    # statistical tolerance: standard error of the mean ~ sqrt(Sigma_ii / n) < 0.01, of the covariance ~ 0.01
    torch.testing.assert_close(out.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), sigma, atol=0.04, rtol=0)


def test_ode_handles_image_and_atom_shapes():
    s, m = 0.25, 0.7  # isotropic data N(m, s I) elementwise: exact map x0 = m + sqrt(s) x1

    def v_iso(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = broadcast_time(t, x_t)
        a_t = (tb - (1 - tb) * s) / ((1 - tb) ** 2 * s + tb**2)
        return -m + a_t * (x_t - (1 - tb) * m)

    images = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    out, traj = sample_ode(v_iso, images, steps=64, method="heun", return_trajectory=True)
    assert out.shape == images.shape and traj.shape == (65, *images.shape)
    torch.testing.assert_close(traj[0], images)
    torch.testing.assert_close(traj[-1], out)
    torch.testing.assert_close(out, m + math.sqrt(s) * images, atol=2e-3, rtol=0)

    seen: list[tuple[int, ...]] = []

    def v_atoms(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return v_iso(x_t, t)

    atoms = torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    out = sample_ode(v_atoms, atoms, steps=64, method="heun", batch_time=False)
    assert set(seen) == {(1,)} and len(seen) == 2 * 64 - 1
    torch.testing.assert_close(out, m + math.sqrt(s) * atoms, atol=2e-3, rtol=0)


def test_ode_stops_at_t_min_on_the_exact_marginal_path():
    # isotropic N(m, s I): the flow from x1 is x_t = (1 - t) m + sqrt((1 - t)^2 s + t^2) x1
    s, m, t_min = 0.5, -0.3, 0.3

    def v_iso(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = broadcast_time(t, x_t)
        return -m + (tb - (1 - tb) * s) / ((1 - tb) ** 2 * s + tb**2) * (x_t - (1 - tb) * m)

    x1 = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=D)
    exact = (1 - t_min) * m + math.sqrt((1 - t_min) ** 2 * s + t_min**2) * x1
    for shift in (1.0, 2.5):
        # Heun's global error is ~0.3e-3 at 32 steps and ~1e-4 at 64 (second order)
        out = sample_ode(v_iso, x1, steps=64, method="heun", t_min=t_min, shift=shift)
        torch.testing.assert_close(out, exact, atol=3e-4, rtol=0)
    # float32 integration (devices without float64) agrees to float32 accuracy
    out32 = sample_ode(v_iso, x1.float(), steps=64, method="heun", t_min=t_min, dtype=torch.float32)
    torch.testing.assert_close(out32.double(), exact, atol=3e-4, rtol=0)


def test_ode_project_is_applied_after_every_step():
    calls = []

    def centre(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x - x.mean(0, keepdim=True)

    def v_shift(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pushes the centre of mass
        return x_t * 0 + torch.tensor([1.0, -2.0, 0.5], dtype=x_t.dtype)

    x1 = torch.randn(9, 3, dtype=D)
    x1 = x1 - x1.mean(0)
    out = sample_ode(v_shift, x1, steps=10, project=centre, batch_time=False)
    assert len(calls) == 10
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=D), atol=1e-12, rtol=0)
    calls.clear()
    sample_ode(v_shift, x1, steps=10, method="heun", project=centre, batch_time=False)
    assert len(calls) == 10 + 9  # the Heun predictor is projected on every step but the last (Euler)
    # without projection the centre of mass drifts by -sum(dt) * v = v
    free = sample_ode(v_shift, x1, steps=10, batch_time=False)
    torch.testing.assert_close(free.mean(0), -torch.tensor([1.0, -2.0, 0.5], dtype=D))


def test_heun_skips_correction_on_the_last_step_and_keeps_dtype():
    times: list[float] = []

    def v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.dtype == torch.float32 and t.dtype == torch.float32  # the model sees the noise's dtype
        times.append(t[0].item())
        return -x_t

    out = sample_ode(v, torch.randn(2, 3), steps=4, method="heun")
    assert out.dtype == torch.float32
    # evaluations at 1, .75 | .75, .5 | .5, .25 | .25 (no evaluation at t = 0, as REPA)
    assert times == pytest.approx([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="returned shape"):
        sample_ode(lambda x, t: x[:1], torch.randn(2, 3), steps=2)


# ------------------------------------------------------------------------------------------------------------
# SDE sampler
# ------------------------------------------------------------------------------------------------------------


def _sde_moments(mu, sigma, steps: int, t_last: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of the Euler–Maruyama chain for Gaussian data.

    Derived independently of the implementation: with score = -(x + (1 - t) v) / t and w = 2t, the drift
    v - (w/2) score = (2 - t) v + x is affine in x when v = -mu + A_t (x - (1 - t) mu), so each step
    x' = M x + c + sqrt(2 t |dt|) xi propagates (m, C) -> (M m + c, M C M^T + 2 t |dt| I).
    """
    d = mu.shape[0]
    eye = torch.eye(d, dtype=D)
    ts = torch.cat([torch.linspace(1, t_last, steps, dtype=D), torch.zeros(1, dtype=D)])
    m, c = torch.zeros(d, dtype=D), eye.clone()
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        dt = t_next - t
        a_t = (t * eye - (1 - t) * sigma) @ torch.linalg.inv((1 - t) ** 2 * sigma + t**2 * eye)
        mat = eye + dt * ((2 - t) * a_t + eye)
        off = dt * (2 - t) * (-mu - (1 - t) * a_t @ mu)
        m = mat @ m + off
        c = mat @ c @ mat.T + (2 * t * abs(dt) * eye if t_next > 0 else 0)
    return m, c


def test_sde_reproduces_gaussian_moments():
    mu, sigma = _gaussian(dim=2, seed=7)
    n, steps = 20_000, 100
    x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    out = sample_sde(_gaussian_velocity(mu, sigma), x1, steps=steps, generator=torch.Generator().manual_seed(1))
    m_exact, c_exact = _sde_moments(mu, sigma, steps, 0.04)
    # Monte Carlo vs the chain's exact moments: standard errors sqrt(C_ii / n) <= 0.01 for the mean and
    # ~ sqrt(2 / n) C_ii <= 0.015 for the covariance; allow 4 standard errors
    se_mean = (torch.diagonal(c_exact) / n).sqrt()
    assert ((out.mean(0) - m_exact).abs() < 4 * se_mean).all()
    se_cov = math.sqrt(2 / n) * torch.diagonal(c_exact).max()
    assert ((torch.cov(out.T) - c_exact).abs() < 4 * se_cov).all()
    # the chain's bias relative to the data (Euler–Maruyama O(dt) and stopping the noise at t_last) is small
    torch.testing.assert_close(m_exact, mu, atol=0.02, rtol=0)
    torch.testing.assert_close(c_exact, sigma, atol=0.05, rtol=0)


def _repa_reference(v, x1, steps: int, gen: torch.Generator) -> torch.Tensor:
    """REPA's euler_maruyama_sampler written out with its generic score for x_t = alpha x + sigma eps."""
    ts = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=D), torch.zeros(1, dtype=D)])
    x = x1.clone()
    for i in range(steps):
        t_cur, t_next = ts[i].item(), ts[i + 1].item()
        alpha, d_alpha, sigma, d_sigma = 1 - t_cur, -1.0, t_cur, 1.0
        v_cur = v(x, torch.full((x.shape[0],), t_cur, dtype=D))
        ratio = alpha / d_alpha
        score = (ratio * v_cur - x) / (sigma**2 - ratio * d_sigma * sigma)
        drift = v_cur - 0.5 * (2 * t_cur) * score
        x_mean = x + (t_next - t_cur) * drift
        if i == steps - 1:
            return x_mean  # the last step is deterministic ("Mean")
        noise = torch.randn(x.shape, generator=gen, dtype=D)
        x = x_mean + math.sqrt(2 * t_cur) * math.sqrt(abs(t_next - t_cur)) * noise
    raise AssertionError("unreachable")


def test_sde_matches_repa_step_by_step():
    mu, sigma = _gaussian(dim=3, seed=3)
    v = _gaussian_velocity(mu, sigma)
    x1 = torch.randn(6, 3, generator=torch.Generator().manual_seed(9), dtype=D)
    for steps in (1, 2, 25):
        ours = sample_sde(v, x1, steps=steps, generator=torch.Generator().manual_seed(11))
        ref = _repa_reference(v, x1, steps, torch.Generator().manual_seed(11))
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


def test_sde_determinism_project_and_grid():
    mu, sigma = _gaussian(dim=3)
    v = _gaussian_velocity(mu, sigma)
    x1 = torch.randn(8, 3, dtype=D)
    a = sample_sde(v, x1, steps=20, generator=torch.Generator().manual_seed(3))
    b = sample_sde(v, x1, steps=20, generator=torch.Generator().manual_seed(3))
    c = sample_sde(v, x1, steps=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)

    times: list[float] = []
    calls = []

    def v_rec(x_t, t):
        times.append(t[0].item())
        return v(x_t, t)

    def proj(x):
        calls.append(1)
        return x - x.mean(0, keepdim=True)

    out, traj = sample_sde(
        v_rec, x1, steps=5, t_last=0.2, project=proj, return_trajectory=True, generator=torch.Generator().manual_seed(0)
    )
    assert times == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])  # linspace(1, t_last, steps), last step to 0
    assert len(calls) == 5 and traj.shape == (6, 8, 3)
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=D), atol=1e-12, rtol=0)
    times.clear()
    sample_sde(v_rec, x1, steps=5, t_last=0.2, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert times[0] == 1.0 and times[-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="t_last"):
        sample_sde(v, x1, t_last=0.0)


# ------------------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------------------


def test_guided_velocity_interval():
    x = torch.zeros(4, 2)
    fn = guided_velocity(lambda x, t: x + 3.0, lambda x, t: x + 1.0, scale=4.0, interval=(0.2, 0.6))
    t = torch.tensor([0.1, 0.2, 0.6, 0.9])
    out = fn(x, t)
    # inside [0.2, 0.6] (inclusive): 1 + 4 (3 - 1) = 9; outside: the conditional velocity 3
    torch.testing.assert_close(out, torch.tensor([[3.0, 3.0], [9.0, 9.0], [9.0, 9.0], [3.0, 3.0]]))
    uncond_calls = []

    def uncond(x, t):
        uncond_calls.append(1)
        return x

    guided_velocity(lambda x, t: x, uncond, scale=2.0, interval=(0.5, 1.0))(x, torch.full((4,), 0.3))
    guided_velocity(lambda x, t: x, uncond, scale=1.0)(x, torch.full((4,), 0.7))
    assert uncond_calls == []  # not evaluated outside the interval or without guidance
    with pytest.raises(ValueError, match="interval"):
        guided_velocity(lambda x, t: x, uncond, 2.0, interval=(0.8, 0.2))


def test_cfg_batched_matches_two_calls_and_guides_first_channels():
    num_classes = 10
    emb = torch.randn(num_classes + 1, 4)

    def model(x, t, y):  # [B, 4, 2, 2]: depends on x, t and the label
        return 0.5 * x + t[:, None, None, None] * emb[y][:, :, None, None]

    calls = []

    def counted(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    y = torch.tensor([1, 3, 7])
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.3, 0.5, 0.9])
    fn = cfg_batched(counted, y, null_label=num_classes, scale=1.5, interval=(0.0, 0.7))
    reference = guided_velocity(
        lambda x, t: model(x, t, y), lambda x, t: model(x, t, torch.full_like(y, num_classes)), 1.5, (0.0, 0.7)
    )
    torch.testing.assert_close(fn(x, t), reference(x, t))
    assert calls == [6]  # one call on the doubled batch
    # DiT's kept bug: only the first 3 channels are guided, the rest stay conditional
    dit = cfg_batched(model, y, num_classes, scale=1.5, channels=3)
    out, cond = dit(x, t), model(x, t, y)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])
    uncond = model(x, t, torch.full_like(y, num_classes))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    full = cfg_batched(model, y, num_classes, scale=1.5)(x, t)
    torch.testing.assert_close(out[:, :3], full[:, :3])
    assert not torch.allclose(out[:, 3:], full[:, 3:])
    # one time for the batch (t[1]) is expanded
    torch.testing.assert_close(fn(x, torch.tensor([0.5])), reference(x, torch.full((3,), 0.5)))


def test_cfg_in_sampler_is_deterministic():
    def model(x, t, y):
        return -x + y[:, None].to(x.dtype)

    y = torch.tensor([0, 1])
    x1 = torch.randn(2, 3, dtype=D)
    v = cfg_batched(model, y, null_label=5, scale=2.0)
    a = sample_ode(v, x1, steps=5, method="heun")
    b = sample_ode(v, x1, steps=5, method="heun")
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_objective_is_the_hand_written_step_and_supports_graph_batches():
    from unirep.flow import FlowMatching, interpolate

    fm = FlowMatching(time_dist="logit_normal", shift=2.0)
    x = torch.randn(5, 3, 4, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    lin = torch.nn.Conv2d(3, 6, 1)  # 6 output channels: DiT's learned sigma, sliced to the velocity channels

    def model_fn(s):
        return lin(s.x_t) * s.t_in.view(-1, 1, 1, 1), "aux"

    step = fm.objective(x, model_fn, generator=g1)
    t = fm.sample_time(5, generator=g2)
    eps = torch.randn(x.shape, generator=g2)
    x_t = interpolate(x, eps, t)
    pred = (lin(x_t) * t.view(-1, 1, 1, 1))[:, :3]
    ref = ((pred - (eps - x)) ** 2).mean(dim=(1, 2, 3)).mean()
    assert step.aux == "aux" and torch.allclose(step.loss, ref) and torch.allclose(step.sample.t, t)
    assert torch.allclose(step.sample.at(step.sample.t), step.sample.x_t)
    # a graph batch: one time per molecule broadcast to its atoms, the loss averaged per molecule
    batch = torch.tensor([0, 0, 0, 1])
    pos = torch.randn(4, 3)
    s = fm.objective(pos, lambda s: torch.zeros_like(s.x_t), batch=batch)
    assert s.sample.t.shape == (2,) and torch.equal(s.sample.t_in, s.sample.t[batch])
    per_atom = (s.sample.target**2).mean(1)
    assert torch.allclose(s.loss, torch.stack([per_atom[:3].mean(), per_atom[3]]).mean())
    with pytest.raises(ValueError, match="noise shape"):
        fm.draw(pos, eps=torch.randn(3, 3), batch=batch)
