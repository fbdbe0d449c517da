"""Flow matching on tensors of any shape: interpolant, targets, time sampling, shift, loss, samplers, guidance.

Convention (REPA, REG, REPA-E, RAE): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x + t eps,        velocity target v = d x_t / dt = eps - x,

and sampling integrates from t = 1 (pure noise) down to t = 0. SiT, LightningDiT and DDT use the reverse
("data time" tau = 1 - t, x_tau = tau x + (1 - tau) eps, v = x - eps); convert their shifts and guidance
intervals when porting a number (see :func:`shift_time` and :func:`shift_from_data_time`).

Papers and anchors:
- Lipman et al. 2023, *Flow Matching for Generative Modeling*; Ma et al. 2024, *SiT* (willisma/SiT).
- Yu et al. 2025, *REPA* (sihyun-yu/REPA ``loss.py``: per-item mean squared error to the velocity;
  ``samplers.py``: ``euler_sampler`` with a float64 grid ``linspace(1, 0, N + 1)`` and Heun's correction
  skipped on the last step, ``euler_maruyama_sampler`` with ``linspace(1, 0.04, N)``, diffusion ``w(t) = 2t``,
  the score derived from the velocity and a final deterministic "Mean" step to t = 0).
- Esser et al. 2024, *SD3* (logit-normal time sampling); Zheng et al. 2025, *RAE* (bytetriper/RAE
  ``transport.py``: dimension-dependent shift ``t' = s t / (1 + (s - 1) t)`` with ``s = sqrt(m / 4096)``).
- Peebles & Xie 2023, *DiT* (facebookresearch/DiT ``forward_with_cfg``: classifier-free guidance in one call on a
  doubled batch, guiding only the first 3 channels, a kept bug); Kynkäänniemi et al. 2024 (guidance interval).

Everything here works on ``[B, ...]`` tensors with one time per item (``t[B]``). Molecular graph batches are
``[N_atoms, 3]`` (or ``[N_atoms, F]``) tensors whose leading dimension counts atoms, not graphs: the caller then
passes one time per atom (``t_graph[batch]``) to the training functions, and runs the samplers with
``batch_time=False`` so that the velocity function receives ``t`` of shape ``[1]`` and expands it per graph
itself (``t.expand(num_graphs)``). :func:`broadcast_time` makes the broadcasting rule explicit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from unirep.tokens import segment_mean

__all__ = [
    "VelocityFn",
    "broadcast_time",
    "interpolate",
    "velocity_target",
    "velocity_to_x0",
    "velocity_to_eps",
    "velocity_to_score",
    "x0_to_velocity",
    "eps_to_velocity",
    "pred_to_velocity",
    "sample_time",
    "shift_time",
    "unshift_time",
    "dimension_shift",
    "shift_from_data_time",
    "time_grid",
    "flow_matching_loss",
    "FlowMatching",
    "FlowSample",
    "FlowStep",
    "sample_ode",
    "sample_sde",
    "guided_velocity",
    "cfg_batched",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``velocity_fn(x_t, t) -> v`` with ``x_t[B, ...]``, ``t[B]`` (or ``t[1]`` with ``batch_time=False``)."""

PredictionKind = Literal["velocity", "x0", "eps"]


# ----------------------------------------------------------------------------------------------------------------
# Interpolant and conversions
# ----------------------------------------------------------------------------------------------------------------


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Reshape a time to broadcast against ``x[B, ...]``.

    ``t`` may be a Python float, a 0-d tensor, a ``[1]`` tensor (one time for the whole tensor) or a ``[B]``
    tensor (one time per leading-dimension item). The result has shape ``[1, 1, ...]`` or ``[B, 1, ...]`` with
    ``x.dim()`` dimensions and ``x``'s dtype and device. For a graph batch ``x[N_atoms, ...]`` pass one time per
    atom, ``t_graph[batch]``: the leading dimension is what ``t`` indexes.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape([1] * max(x.dim(), 1))
    if t.dim() != 1 or x.dim() == 0 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"time of shape {tuple(t.shape)} does not match x of shape {tuple(x.shape)}: pass t[B] with "
            f"B = x.shape[0], a scalar, or t[1]; for a graph batch expand the per-graph times per atom (t[batch])"
        )
    return t.to(x.dtype).reshape(t.shape[0], *([1] * (x.dim() - 1)))


def interpolate(x: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x + t eps`` (t = 0 data, t = 1 noise)."""
    tb = broadcast_time(t, x)
    return (1.0 - tb) * x + tb * eps


def velocity_target(x: Tensor, eps: Tensor) -> Tensor:
    """``v = d x_t / dt = eps - x``; independent of t for this linear interpolant."""
    return eps - x


def velocity_to_x0(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """Data prediction from a velocity: ``x0 = x_t - t v``."""
    return x_t - broadcast_time(t, x_t) * v


def velocity_to_eps(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """Noise prediction from a velocity: ``eps = x_t + (1 - t) v``."""
    return x_t + (1.0 - broadcast_time(t, x_t)) * v


def x0_to_velocity(x0: Tensor, x_t: Tensor, t: Tensor | float, clamp: float = 1e-3) -> Tensor:
    """Velocity from a data prediction: ``v = (x_t - x0) / t``.

    ``t`` is clamped below at ``clamp`` because the division is singular at t = 0, where ``x_t = x0`` carries
    no information about the noise (JiT uses 0.05 for the same reason in training).
    """
    tb = broadcast_time(t, x_t).clamp_min(clamp)
    return (x_t - x0) / tb


def eps_to_velocity(eps: Tensor, x_t: Tensor, t: Tensor | float, clamp: float = 1e-3) -> Tensor:
    """Velocity from a noise prediction: ``v = (eps - x_t) / (1 - t)``.

    ``1 - t`` is clamped below at ``clamp``: at t = 1, ``x_t = eps`` and the data cannot be recovered from it.
    """
    one_minus_t = (1.0 - broadcast_time(t, x_t)).clamp_min(clamp)
    return (eps - x_t) / one_minus_t


def pred_to_velocity(pred: Tensor, kind: PredictionKind, x_t: Tensor, t: Tensor | float, clamp: float = 1e-3) -> Tensor:
    """Convert a network output of the given kind (``"velocity"``, ``"x0"`` or ``"eps"``) to a velocity."""
    if kind == "velocity":
        return pred
    if kind == "x0":
        return x0_to_velocity(pred, x_t, t, clamp)
    if kind == "eps":
        return eps_to_velocity(pred, x_t, t, clamp)
    raise ValueError(f"unknown prediction kind {kind!r}: use 'velocity', 'x0' or 'eps'")


def velocity_to_score(v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """Score ``grad log p_t(x_t)`` from a velocity.

    For ``x_t = (1 - t) x + t eps``, Tweedie gives ``score = -E[eps | x_t] / t`` and ``E[eps | x_t] = x_t +
    (1 - t) v``, so ``score = -(x_t + (1 - t) v) / t`` (REPA's ``get_score_from_velocity`` for the linear path,
    where its variance term ``t^2 + (1 - t) t`` equals t). Undefined at t = 0: callers keep ``t > 0``.
    """
    tb = broadcast_time(t, x_t)
    return -(x_t + (1.0 - tb) * v) / tb


# ----------------------------------------------------------------------------------------------------------------
# Time sampling and shift
# ----------------------------------------------------------------------------------------------------------------


def sample_time(
    n: int,
    kind: Literal["uniform", "logit_normal"] = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` training times in [0, 1].

    ``"uniform"``: U(0, 1) (REPA, SiT). ``"logit_normal"``: ``sigmoid(N(mean, std^2))`` (SD3, RAE with (0, 1)).
    Random numbers are drawn on the generator's device (so a CPU generator works for CUDA training) and moved.
    """
    if n < 0:
        raise ValueError(f"sample_time: n must be >= 0, got {n}")
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device, dtype=dtype)
    elif kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"sample_time: logit_normal needs std > 0, got {std}")
        z = torch.randn(n, generator=generator, device=gen_device, dtype=dtype)
        t = torch.sigmoid(mean + std * z)
    else:
        raise ValueError(f"sample_time: unknown kind {kind!r}: use 'uniform' or 'logit_normal'")
    return t.to(device) if device is not None else t


def shift_time(t: Tensor | float, s: float) -> Tensor | float:
    """Noise-time shift ``t' = s t / (1 + (s - 1) t)`` (RAE, SD3).

    ``s > 1`` moves times towards noise (t = 1), which higher-dimensional data need (:func:`dimension_shift`).
    Fixes 0 and 1, is increasing for ``s > 0``, and its inverse is ``shift_time(., 1 / s)``.
    Data-time codebases (LightningDiT, SiT: tau = 1 - t is data) write the same formula with a parameter ``a`` in
    tau; that is this function with ``s = 1 / a`` (LightningDiT's ``timestep_shift = 0.3`` is ``s = 3.33``):
    see :func:`shift_from_data_time`.
    """
    if s <= 0:
        raise ValueError(f"shift_time: shift must be > 0, got {s}")
    if s == 1.0:
        return t
    return s * t / (1.0 + (s - 1.0) * t)


def unshift_time(t: Tensor | float, s: float) -> Tensor | float:
    """Inverse of :func:`shift_time`: ``t = t' / (s - (s - 1) t')``."""
    return shift_time(t, 1.0 / s)


def dimension_shift(m: int, base: int = 4096) -> float:
    """RAE's dimension-dependent shift ``s = sqrt(m / base)`` for data with ``m`` numbers per item.

    E.g. RAE's DINOv2-B latents 768 x 16 x 16 = 196,608 give s ~ 6.93; SD-VAE latents 4 x 32 x 32 = 4096 give 1.
    """
    if m <= 0 or base <= 0:
        raise ValueError(f"dimension_shift: m and base must be positive, got m={m}, base={base}")
    return math.sqrt(m / base)


def shift_from_data_time(a: float) -> float:
    """Convert a data-time shift parameter ``a`` (``tau' = a tau / (1 + (a - 1) tau)``, tau = 1 data) to ``s``.

    With ``t = 1 - tau``: ``1 - shift_time(1 - tau, s) = tau / (tau + s (1 - tau))``, which is the data-time formula
    with ``a = 1 / s``. LightningDiT's 0.3 therefore becomes 3.33.
    """
    if a <= 0:
        raise ValueError(f"shift_from_data_time: shift must be > 0, got {a}")
    return 1.0 / a


def time_grid(steps: int, t_end: float = 0.0, shift: float = 1.0) -> Tensor:
    """Float64 sampling grid from 1 to ``t_end`` with ``steps + 1`` points, uniform in unshifted time.

    The uniform grid ``linspace(1, unshift(t_end), steps + 1)`` is mapped through :func:`shift_time`, so the grid
    starts at 1 and ends exactly at ``t_end`` for every shift (REPA's grid for shift 1, RAE's shifted grid).
    """
    if steps < 1:
        raise ValueError(f"time_grid: steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"time_grid: t_end must be in [0, 1), got {t_end}")
    u_end = float(unshift_time(t_end, shift))
    grid = shift_time(torch.linspace(1.0, u_end, steps + 1, dtype=torch.float64), shift)
    # pin the endpoints against rounding in the shift
    grid[0], grid[-1] = 1.0, t_end
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Loss and the training helper
# ----------------------------------------------------------------------------------------------------------------


def flow_matching_loss(
    pred_v: Tensor,
    x: Tensor,
    eps: Tensor,
    reduce_dims: Sequence[int] | None = None,
    weight: Tensor | None = None,
    batch: Tensor | None = None,
    num_items: int | None = None,
) -> Tensor:
    """Mean squared error of ``pred_v`` to ``eps - x``: mean per item, optionally weighted, then batch mean.

    Args:
        pred_v: predicted velocity ``[B, ...]``.
        x, eps: data and noise of the same shape.
        reduce_dims: dimensions averaged per item (default: all but the first, REPA's ``mean_flat``).
        weight: optional per-item weight ``[B]`` (``[num_items]`` with ``batch``).
        batch: for a graph batch ``[N_atoms, ...]``, the graph index of each row ``[N_atoms]``: the per-item mean
            is then taken over each graph's atoms, so every molecule counts once whatever its size.
        num_items: number of graphs (default ``batch.max() + 1``).
    """
    target = velocity_target(x, eps)
    return _weighted_mse(pred_v, target, reduce_dims, weight, batch, num_items)


def _weighted_mse(
    pred: Tensor,
    target: Tensor,
    reduce_dims: Sequence[int] | None,
    weight: Tensor | None,
    batch: Tensor | None = None,
    num_items: int | None = None,
) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"flow matching loss: prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    # accumulate in at least float32 (bf16/fp16 predictions under autocast), keep float64 as is
    acc = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    sq = (pred.to(acc) - target.to(acc)) ** 2
    dims = list(range(1, sq.dim())) if reduce_dims is None else list(reduce_dims)
    per_item = sq.mean(dim=dims) if dims else sq  # [B] (or the kept dims)
    if batch is not None:
        if batch.shape != per_item.shape[:1]:
            raise ValueError(f"flow matching loss: batch must be [N] = [{per_item.shape[0]}], got {tuple(batch.shape)}")
        n = int(batch.max()) + 1 if num_items is None else num_items
        per_item = segment_mean(per_item, batch, n)  # [N_atoms, ...] -> [num_items, ...]
    if weight is not None:
        if weight.shape != per_item.shape[:1]:
            raise ValueError(
                f"flow matching loss: weight must be [B] = [{per_item.shape[0]}], got {tuple(weight.shape)}"
            )
        per_item = per_item * weight.to(per_item.dtype).reshape(-1, *([1] * (per_item.dim() - 1)))
    return per_item.mean()


class FlowMatching:
    """Time sampler + shift + interpolant + loss in one object, so a task writes three lines::

        x_t, t, target = fm.training_pair(x)
        pred = model(x_t, t)
        loss = fm.loss(pred, target, x_t, t)

    Args:
        time_dist: ``"uniform"`` or ``"logit_normal"`` (:func:`sample_time`).
        mean, std: logit-normal parameters.
        shift: noise-time shift applied to the sampled times (:func:`shift_time`); 1 means none.
        prediction: what the network outputs (``"velocity"``, ``"x0"`` or ``"eps"``); the loss is always on the
            velocity, converting the prediction with :func:`pred_to_velocity`.
        clamp: clamp of the conversion's division (see :func:`x0_to_velocity`).
    """

    def __init__(
        self,
        time_dist: Literal["uniform", "logit_normal"] = "uniform",
        mean: float = 0.0,
        std: float = 1.0,
        shift: float = 1.0,
        prediction: PredictionKind = "velocity",
        clamp: float = 1e-3,
    ) -> None:
        if time_dist not in ("uniform", "logit_normal"):
            raise ValueError(f"FlowMatching: unknown time_dist {time_dist!r}: use 'uniform' or 'logit_normal'")
        if prediction not in ("velocity", "x0", "eps"):
            raise ValueError(f"FlowMatching: unknown prediction {prediction!r}: use 'velocity', 'x0' or 'eps'")
        if shift <= 0:
            raise ValueError(f"FlowMatching: shift must be > 0, got {shift}")
        self.time_dist = time_dist
        self.mean = mean
        self.std = std
        self.shift = shift
        self.prediction = prediction
        self.clamp = clamp

    def sample_time(self, n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> Tensor:
        """``n`` training times: drawn from the time distribution, then shifted."""
        t = sample_time(n, self.time_dist, self.mean, self.std, generator=generator, device=device, dtype=dtype)
        return shift_time(t, self.shift)

    def training_pair(
        self, x: Tensor, generator: torch.Generator | None = None, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``t[B]`` and ``eps ~ N(0, I)``; return ``(x_t, t, target)`` with ``target = eps - x``.

        Pass ``t`` to use given times (e.g. per-atom times ``t_graph[batch]`` for a graph batch).
        """
        if t is None:
            # times in at least float32 even for half-precision data
            t_dtype = torch.promote_types(x.dtype, torch.float32)
            t = self.sample_time(x.shape[0], generator=generator, device=x.device, dtype=t_dtype)
        if generator is None:
            eps = torch.randn_like(x)
        else:
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return interpolate(x, eps, t), t, velocity_target(x, eps)

    def loss(
        self,
        pred: Tensor,
        target: Tensor,
        x_t: Tensor | None = None,
        t: Tensor | None = None,
        reduce_dims: Sequence[int] | None = None,
        weight: Tensor | None = None,
        batch: Tensor | None = None,
        num_items: int | None = None,
    ) -> Tensor:
        """Velocity MSE (per item mean, then batch mean); ``x_t`` and ``t`` are needed for x0/eps predictions."""
        if self.prediction != "velocity":
            if x_t is None or t is None:
                raise ValueError(f"FlowMatching.loss: prediction={self.prediction!r} needs x_t and t to convert")
            pred = pred_to_velocity(pred, self.prediction, x_t, t, self.clamp)
        return _weighted_mse(pred, target, reduce_dims, weight, batch, num_items)

    def velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """The network's output as a velocity (for sampling with an x0/eps-predicting network)."""
        return pred_to_velocity(pred, self.prediction, x_t, t, self.clamp)

    def draw(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        batch: Tensor | None = None,
        num_items: int | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowSample:
        """One training draw for data ``x``: per-item times, noise (``eps`` from a prior, else Gaussian), ``x_t``.

        For a graph batch (``x[N_atoms, ...]``) pass ``batch[N_atoms]``: one time per graph, broadcast to its atoms.
        """
        if batch is None:
            n = x.shape[0]
        else:
            n = int(batch.max()) + 1 if num_items is None else int(num_items)
        t_dtype = torch.promote_types(x.dtype, torch.float32)
        t = self.sample_time(n, generator=generator, device=x.device, dtype=t_dtype)  # [B]
        t_in = t if batch is None else t[batch]  # what the network sees: per item, or per atom
        if eps is None:
            if generator is None:
                eps = torch.randn_like(x)
            else:
                eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        elif eps.shape != x.shape:
            raise ValueError(f"FlowMatching.draw: noise shape {tuple(eps.shape)} != data shape {tuple(x.shape)}")
        return FlowSample(x, eps, t, t_in, interpolate(x, eps, t_in), velocity_target(x, eps), batch, n)

    def objective(
        self,
        x: Tensor,
        model_fn: Callable[[FlowSample], Any],
        eps: Tensor | None = None,
        batch: Tensor | None = None,
        num_items: int | None = None,
        weight: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowStep:
        """The whole flow-matching objective in one call: draw, run ``model_fn(sample)``, velocity loss.

        ``model_fn`` returns the prediction, or ``(prediction, aux)`` where ``aux`` (hidden tokens for alignment,
        extra heads) is handed back untouched in :attr:`FlowStep.aux`. The prediction may carry extra channels
        (DiT's learned sigma): only its first ``x.shape[1]`` channels enter the loss.
        """
        sample = self.draw(x, eps=eps, batch=batch, num_items=num_items, generator=generator)
        out = model_fn(sample)
        pred, aux = out if isinstance(out, tuple) else (out, None)
        if pred.dim() > 1 and pred.shape[1] != x.shape[1] and pred.shape[2:] == x.shape[2:]:
            pred = pred[:, : x.shape[1]]  # learn_sigma: the velocity channels only
        loss = self.loss(pred, sample.target, sample.x_t, sample.t_in, weight=weight, batch=batch, num_items=sample.n)
        return FlowStep(loss=loss, pred=pred, aux=aux, sample=sample)


@dataclass
class FlowSample:
    """One training draw: data ``x``, noise ``eps``, item times ``t[B]``, network times ``t_in``, ``x_t``, target."""

    x: Tensor
    eps: Tensor
    t: Tensor
    t_in: Tensor
    x_t: Tensor
    target: Tensor
    batch: Tensor | None
    n: int

    def at(self, t: Tensor) -> Tensor:
        """The same data and noise interpolated at other item times ``t[B]`` (an EMA target's less noisy input)."""
        return interpolate(self.x, self.eps, t if self.batch is None else t[self.batch])


@dataclass
class FlowStep:
    """What :meth:`FlowMatching.objective` returns: the loss, the prediction, the model's ``aux`` and the draw."""

    loss: Tensor
    pred: Tensor
    aux: Any
    sample: FlowSample


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------


def _evaluate(velocity_fn: VelocityFn, x: Tensor, t: float, model_dtype: torch.dtype, batch_time: bool) -> Tensor:
    """Call the velocity function at state ``x`` (integration dtype) and time ``t``; return ``v`` in x's dtype.

    As REPA, the state and the grid stay in float64 and the model sees the dtype of the initial noise. The grid is
    kept as Python floats, so no step synchronises with the device and devices without float64 work.
    """
    n = x.shape[0] if batch_time else 1
    t_in = torch.full((n,), t, dtype=model_dtype, device=x.device)  # [B] or [1]
    v = velocity_fn(x.to(model_dtype), t_in)
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for x_t of shape {tuple(x.shape)}")
    return v.to(x.dtype)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn,
    x1: Tensor,
    steps: int = 50,
    method: Literal["euler", "heun"] = "euler",
    shift: float = 1.0,
    t_min: float = 0.0,
    project: Callable[[Tensor], Tensor] | None = None,
    return_trajectory: bool = False,
    batch_time: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate ``dx/dt = v(x, t)`` from noise ``x1`` at t = 1 to ``t_min`` (REPA's ``euler_sampler``).

    The grid is :func:`time_grid` (float64, ``linspace(1, 0, steps + 1)`` mapped through the shift). ``"heun"`` is
    the explicit trapezoid rule (second order); as REPA, its correction is skipped on a step that ends at t = 0,
    which costs one evaluation and keeps the model away from t = 0. Each step costs one (Euler) or two (Heun)
    calls to ``velocity_fn(x_t, t)``, with ``t[B]`` (``t[1]`` when ``batch_time=False``, for graph batches).

    Args:
        velocity_fn: the (guided) velocity; see :func:`guided_velocity`, :func:`cfg_batched`.
        x1: initial noise ``[B, ...]``; the model is called in its dtype.
        project: applied to the state after every step and to Heun's predictor (e.g. zero centre of mass);
            project the initial noise yourself.
        return_trajectory: also return the states ``[steps + 1, B, ...]`` (in ``x1``'s dtype).
        dtype: integration dtype (float64 as REPA; float32 on devices without float64).
    Returns:
        the sample at ``t_min`` in ``x1``'s dtype, and the trajectory if asked for.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"sample_ode: unknown method {method!r}: use 'euler' or 'heun'")
    grid = time_grid(steps, t_min, shift).tolist()
    model_dtype = x1.dtype
    x = x1.to(dtype)
    trajectory = [x1] if return_trajectory else None
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        h = t_next - t_cur  # negative: time runs from noise to data
        d_cur = _evaluate(velocity_fn, x, t_cur, model_dtype, batch_time)
        x_next = x + h * d_cur
        if method == "heun" and t_next > 0:
            x_pred = project(x_next) if project is not None else x_next
            d_next = _evaluate(velocity_fn, x_pred, t_next, model_dtype, batch_time)
            x_next = x + h * (0.5 * d_cur + 0.5 * d_next)
        x = project(x_next) if project is not None else x_next
        if trajectory is not None:
            trajectory.append(x.to(model_dtype))
    out = x.to(model_dtype)
    if trajectory is not None:
        return out, torch.stack(trajectory)
    return out


@torch.no_grad()
def sample_sde(
    velocity_fn: VelocityFn,
    x1: Tensor,
    steps: int = 250,
    shift: float = 1.0,
    t_last: float = 0.04,
    project: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    batch_time: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Euler–Maruyama on the reverse SDE with the same marginals (REPA's ``euler_maruyama_sampler``).

    ``dx = [v - (w/2) score] dt + sqrt(w) dW`` with diffusion ``w(t) = 2t`` and the score from the velocity
    (:func:`velocity_to_score`), run with ``dt < 0`` on the grid ``linspace(1, t_last, steps)`` (shifted, ending at
    ``t_last``), then one deterministic step of the same drift from ``t_last`` to 0 (REPA's last step "Mean").
    ``steps`` counts velocity evaluations (``steps - 1`` stochastic steps plus the last one). Noise comes from
    ``generator``, so a seeded generator makes sampling reproducible. The drift equals ``(2 - t) v + x_t``, affine
    in ``v`` with the same ``x_t`` for both branches, so guiding the velocity (:func:`guided_velocity`) is the same
    as REPA's guiding of the drift.

    Returns the sample in ``x1``'s dtype, and the states ``[steps + 1, B, ...]`` if ``return_trajectory``.
    """
    if steps < 1:
        raise ValueError(f"sample_sde: steps must be >= 1, got {steps}")
    if not 0.0 < t_last < 1.0:
        raise ValueError(f"sample_sde: t_last must be in (0, 1), got {t_last}: the score is singular at t = 0")
    # steps points from 1 to t_last, then 0 appended for the deterministic last step
    grid = time_grid(steps - 1, t_last, shift).tolist() if steps > 1 else [1.0]
    grid.append(0.0)
    model_dtype = x1.dtype
    x = x1.to(dtype)
    trajectory = [x1] if return_trajectory else None
    for i in range(len(grid) - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        v = _evaluate(velocity_fn, x, t_cur, model_dtype, batch_time)
        w = 2.0 * t_cur  # REPA's compute_diffusion
        drift = v - 0.5 * w * velocity_to_score(v, x, t_cur)
        x_next = x + drift * dt
        if t_next > 0:
            x_next = x_next + math.sqrt(w * abs(dt)) * _randn(x, generator)
        x = project(x_next) if project is not None else x_next
        if trajectory is not None:
            trajectory.append(x.to(model_dtype))
    out = x.to(model_dtype)
    if trajectory is not None:
        return out, torch.stack(trajectory)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------------------


def _in_interval(t: Tensor, interval: tuple[float, float]) -> Tensor:
    low, high = interval
    return (t >= low) & (t <= high)  # inclusive, as REPA's guidance_low <= t <= guidance_high


def _check_interval(interval: tuple[float, float]) -> None:
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1 (noise time), got {interval}")


def guided_velocity(
    velocity_fn_cond: VelocityFn,
    velocity_fn_uncond: VelocityFn,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> VelocityFn:
    """Classifier-free guidance ``v_u + scale (v_c - v_u)`` for items whose t lies in ``interval``, else ``v_c``.

    The interval is in noise time (t = 1 noise), as REPA's ``guidance_low``/``guidance_high``; a data-time
    interval ``[a, b]`` from SiT/LightningDiT is ``[1 - b, 1 - a]`` here. The unconditional branch is not
    evaluated when no item is inside the interval or when ``scale == 1``.
    """
    _check_interval(interval)

    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        v_c = velocity_fn_cond(x_t, t)
        if scale == 1.0:
            return v_c
        inside = _in_interval(t, interval)
        if not bool(inside.any()):
            return v_c
        v_u = velocity_fn_uncond(x_t, t)
        guided = v_u + scale * (v_c - v_u)
        mask = broadcast_time(inside, v_c).bool()
        return torch.where(mask, guided, v_c)

    return fn


def cfg_batched(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    y: Tensor,
    null_label: int | Tensor,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: int | None = None,
) -> VelocityFn:
    """Classifier-free guidance with conditional and unconditional branches in one call on a doubled batch.

    ``model_fn(x_t, t, y) -> v`` is called on ``cat([x_t, x_t])``, ``cat([t, t])``, ``cat([y, y_null])`` (DiT's
    ``forward_with_cfg``). ``null_label`` is the null class index (``num_classes``) or a tensor broadcastable to
    one item of ``y``. ``channels=k`` guides only ``v[:, :k]`` and keeps the conditional rest, reproducing
    DiT/SiT/LightningDiT's kept bug (k = 3, DiT issue #41) to compare with their numbers; the default guides all
    channels (REPA, REG, RAE). Outside ``interval`` (noise time) only the conditional branch is evaluated.
    For dense ``[B, ...]`` states with ``t[B]``; a ``t[1]`` is expanded to the batch.
    """
    _check_interval(interval)
    if isinstance(null_label, Tensor):
        y_null = null_label.to(y.device, y.dtype).expand_as(y)
    else:
        y_null = torch.full_like(y, null_label)

    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        b = x_t.shape[0]
        if y.shape[0] != b:
            raise ValueError(f"cfg_batched: labels y have {y.shape[0]} items but x_t has {b}")
        t = t.expand(b) if t.numel() == 1 else t
        inside = _in_interval(t, interval)
        if scale == 1.0 or not bool(inside.any()):
            return model_fn(x_t, t, y)
        v = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]))  # [2B, ...]
        v_c, v_u = v[:b], v[b:]
        k = v_c.shape[1] if channels is None else channels
        guided = v_c.clone()
        guided[:, :k] = v_u[:, :k] + scale * (v_c[:, :k] - v_u[:, :k])
        mask = broadcast_time(inside, v_c).bool()
        return torch.where(mask, guided, v_c)

    return fn
