"""MeanFlow: the average-velocity objective and its one-step (or few-step) sampler.

Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447); anchor code
Gsunshine/meanflow ``meanflow.py`` (the official JAX implementation: ``sample_tr``, ``guidance_fn``, ``cond_drop``,
``forward``, ``solver_step``) and ``models/models_dit.py`` (the DiT conditioned on ``t`` and ``h = t - r``); the
PyTorch port zhuyu-cs/MeanFlow ``loss.py`` / ``meanflow_sampler.py`` was read for comparison.

Time convention: the anchor's and this project's (t = 0 data, t = 1 noise, ``z_t = (1 - t) x + t e``,
``v = e - x``). The network predicts the average velocity over ``[r, t]``,

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

and the MeanFlow identity ``u = v - (t - r) d/dt u`` gives the regression target

    u_tgt = v - (t - r) (v . d_z u + d_t u),     stop-gradient,

whose total derivative is one forward-mode product: ``torch.func.jvp`` of ``(z, t, r) -> u`` along the tangent
``(v, 1, 0)``. ``torch.nn.functional.scaled_dot_product_attention``'s fused kernels have no forward-mode derivative,
so the product runs with SDPA's math backend (the same function, written out).

Anchor defaults (``configs/default.py``), all constructor arguments here:

- (r, t): two logit-normal draws ``sigmoid(N(-0.4, 1))``, sorted (``t >= r``); a share 1 - ``ratio_r_neq_t`` of the
  batch has ``r = t`` (the anchor's ``data_proportion = 0.75``: 25 % of the items have ``r != t``, the paper's best
  in its Table 1a). The anchor sets ``r = t`` on the first ``int(0.75 B)`` items of a batch; so does this code.
- loss: per item the squared error summed over all elements, divided by the stop-gradient adaptive weight
  ``(||u - u_tgt||^2 + c)^p`` with ``p = 1``, ``c = 0.01`` (the paper writes ``c`` = 1e-3; the code uses 0.01), then
  the batch mean. ``p = 0`` is the plain squared error.
- training-time guidance (the paper's Sec. 4.2, "MeanFlow with guidance"): the target's instantaneous velocity is
  ``v_g = omega v + (1 - omega - kappa) u(z_t, t, t | null) + kappa u(z_t, t, t | y)`` for ``t`` in
  ``[t_start, t_end]``, ``v`` itself for items whose label is dropped. Defaults here ``omega = 1, kappa = 0``: no
  guidance (``v_g = v``, no extra forward pass); the anchor's ImageNet config uses ``omega = 1, kappa = 0.5``.
- sampling: ``z_r = z_t - (t - r) u(z_t, r, t)`` on ``linspace(1, 0, steps + 1)``; one step is
  ``z_0 = z_1 - u(z_1, 0, 1)``, 1 NFE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from unirep.flow import broadcast_time, sample_time

__all__ = ["MeanFlow", "MeanFlowStep", "sample_meanflow", "meanflow_target"]

#: ``u_fn(z_t, t, r) -> u`` or ``(u, aux)``: the average velocity over ``[r, t]``
AverageVelocityFn = Callable[[Tensor, Tensor, Tensor], Any]


def meanflow_target(
    u_fn: AverageVelocityFn, z_t: Tensor, t: Tensor, r: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Any]:
    """``(u, u_tgt, aux)``: the prediction ``u(z_t, r, t)`` (with gradient) and the detached MeanFlow target.

    ``u_tgt = v - (t - r) du/dt`` with ``du/dt = v . d_z u + d_t u`` from one ``torch.func.jvp`` along
    ``(v, 1, 0)``; ``t - r`` is clipped to [0, 1] as in the anchor. ``u_fn`` may return ``(u, aux)`` (hidden tokens
    for an alignment term): ``aux`` comes back from the same forward pass, with gradient.
    """

    def fn(z: Tensor, tt: Tensor, rr: Tensor) -> tuple[Tensor, Any]:
        out = u_fn(z, tt, rr)
        return out if isinstance(out, tuple) else (out, ())  # jvp's aux must hold tensors only

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
        u, du_dt, aux = torch.func.jvp(fn, (z_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), has_aux=True)
    aux = None if isinstance(aux, tuple) and not aux else aux
    h = broadcast_time((t - r).clamp(0.0, 1.0), v)
    u_tgt = (v - h * du_dt).detach()
    return u, u_tgt, aux


@dataclass
class MeanFlowStep:
    """One MeanFlow training draw and its loss: the model's aux (hidden tokens) and the logged parts."""

    loss: Tensor
    u: Tensor
    u_tgt: Tensor
    t: Tensor
    r: Tensor
    x: Tensor
    eps: Tensor
    aux: Any
    logs: dict[str, Tensor]


class MeanFlow:
    """MeanFlow's training objective (see the module docstring for the anchor and its defaults).

    Args:
        time_dist, mean, std: the distribution of both times (``"logit_normal"`` with (-0.4, 1.0), or ``"uniform"``).
        ratio_r_neq_t: the share of items with ``r != t`` (anchor 0.25); 0 is plain flow matching.
        adaptive_p, adaptive_eps: the adaptive weight ``1 / (||u - u_tgt||^2 + eps)^p`` (anchor 1.0, 0.01).
        omega, kappa, guidance_interval: training-time guidance (``omega = 1, kappa = 0`` is none).
    """

    def __init__(
        self,
        time_dist: str = "logit_normal",
        mean: float = -0.4,
        std: float = 1.0,
        ratio_r_neq_t: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_eps: float = 0.01,
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if time_dist not in ("uniform", "logit_normal"):
            raise ValueError(f"MeanFlow time_dist={time_dist!r}: use 'uniform' or 'logit_normal'")
        if not 0.0 <= ratio_r_neq_t <= 1.0:
            raise ValueError(f"MeanFlow ratio_r_neq_t must be in [0, 1], got {ratio_r_neq_t}")
        if adaptive_p < 0 or adaptive_eps <= 0:
            raise ValueError(f"MeanFlow needs adaptive_p >= 0 and adaptive_eps > 0, got {adaptive_p}, {adaptive_eps}")
        low, high = float(guidance_interval[0]), float(guidance_interval[1])
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"MeanFlow guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
        self.time_dist, self.mean, self.std = time_dist, float(mean), float(std)
        self.ratio_r_neq_t = float(ratio_r_neq_t)
        self.adaptive_p, self.adaptive_eps = float(adaptive_p), float(adaptive_eps)
        self.omega, self.kappa = float(omega), float(kappa)
        self.guidance_interval = (low, high)

    def __repr__(self) -> str:
        return (
            f"MeanFlow(time_dist={self.time_dist!r}, mean={self.mean}, std={self.std}, "
            f"ratio_r_neq_t={self.ratio_r_neq_t}, adaptive_p={self.adaptive_p}, adaptive_eps={self.adaptive_eps}, "
            f"omega={self.omega}, kappa={self.kappa}, guidance_interval={self.guidance_interval})"
        )

    @property
    def guided(self) -> bool:
        return not (self.omega == 1.0 and self.kappa == 0.0)

    def sample_times(
        self, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """``(t, r)``, each ``[n]``: two draws sorted (``t >= r``); the first ``int(n (1 - ratio))`` get ``r = t``."""
        a = sample_time(n, self.time_dist, self.mean, self.std, device=device, dtype=dtype)
        b = sample_time(n, self.time_dist, self.mean, self.std, device=device, dtype=dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        n_equal = int(n * (1.0 - self.ratio_r_neq_t))
        equal = torch.arange(n, device=t.device) < n_equal
        return t, torch.where(equal, t, r)

    def loss(self, u: Tensor, u_tgt: Tensor) -> tuple[Tensor, Tensor]:
        """``(weighted loss, unweighted per-item sum of squares [B])``: the anchor's adaptive weighting."""
        acc = torch.promote_types(u.dtype, torch.float32)
        sq = (u.to(acc) - u_tgt.to(acc)).square().flatten(1).sum(1)  # [B]: summed over all elements
        weight = (sq.detach() + self.adaptive_eps).pow(self.adaptive_p)
        return (sq / weight).mean(), sq

    def guided_velocity(
        self, v: Tensor, z_t: Tensor, t: Tensor, dropped: Tensor | None, v_fn: Callable[[Tensor, Tensor, bool], Tensor]
    ) -> Tensor:
        """The target's velocity ``v_g`` (anchor ``guidance_fn`` + ``cond_drop``).

        ``v_fn(z_t, t, conditional) -> instantaneous velocity`` (the network at ``r = t``, no gradient) with the
        item's label or the null label; items with a dropped label (``dropped[B]``) keep ``v``.
        """
        if not self.guided:
            return v
        with torch.no_grad():
            v_u = v_fn(z_t, t, False)
            v_c = v_fn(z_t, t, True) if self.kappa != 0.0 else torch.zeros_like(v)
        low, high = self.guidance_interval
        inside = (t >= low) & (t <= high)
        omega = broadcast_time(torch.where(inside, self.omega, 1.0), v)
        kappa = broadcast_time(torch.where(inside, self.kappa, 0.0), v)
        v_g = omega * v + (1.0 - omega - kappa) * v_u + kappa * v_c
        if dropped is not None:
            v_g = torch.where(broadcast_time(dropped, v).bool(), v, v_g)
        return v_g

    def objective(
        self,
        x: Tensor,
        u_fn: AverageVelocityFn,
        v_fn: Callable[[Tensor, Tensor, bool], Tensor] | None = None,
        dropped: Tensor | None = None,
    ) -> MeanFlowStep:
        """Draw ``(t, r)`` and noise, build ``z_t`` and the (guided) velocity, run the JVP and the adaptive loss."""
        t_dtype = torch.promote_types(x.dtype, torch.float32)
        t, r = self.sample_times(x.shape[0], device=x.device, dtype=t_dtype)
        eps = torch.randn_like(x)
        tb = broadcast_time(t, x)
        z_t = (1.0 - tb) * x + tb * eps
        v = eps - x
        if self.guided:
            if v_fn is None:
                raise ValueError("MeanFlow with training-time guidance (omega != 1 or kappa != 0) needs v_fn")
            v_g = self.guided_velocity(v, z_t, t, dropped, v_fn)
        else:
            v_g = v
        u, u_tgt, aux = meanflow_target(u_fn, z_t, t.to(x.dtype), r.to(x.dtype), v_g)
        loss, sq = self.loss(u, u_tgt)
        with torch.no_grad():
            v_loss = (u.float() - v.float()).square().flatten(1).sum(1).mean()  # monitoring only, as the anchor
        logs = {"loss/meanflow_sq": sq.mean().detach(), "loss/v": v_loss, "meanflow/r_neq_t": (t != r).float().mean()}
        return MeanFlowStep(loss=loss, u=u, u_tgt=u_tgt, t=t, r=r, x=x, eps=eps, aux=aux, logs=logs)


@torch.no_grad()
def sample_meanflow(u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x1: Tensor, steps: int = 1) -> Tensor:
    """``z_r = z_t - (t - r) u(z_t, r, t)`` on ``linspace(1, 0, steps + 1)``; ``steps`` network evaluations.

    ``u_fn(z_t, t, r) -> u`` with ``t[B]``, ``r[B]`` in ``x1``'s dtype; one step is ``z_0 = z_1 - u(z_1, 0, 1)``.
    """
    if steps < 1:
        raise ValueError(f"sample_meanflow: steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    z = x1
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        t = torch.full((z.shape[0],), t_cur, dtype=z.dtype, device=z.device)
        r = torch.full((z.shape[0],), t_next, dtype=z.dtype, device=z.device)
        u = u_fn(z, t, r)
        if u.shape != z.shape:
            raise ValueError(f"sample_meanflow: u_fn returned {tuple(u.shape)} for a state of shape {tuple(z.shape)}")
        z = z - (t_cur - t_next) * u
    return z
