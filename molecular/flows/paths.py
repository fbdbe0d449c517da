"""ET-Flow's probability path on conformers, on top of :class:`unirep.flow.FlowMatching`.

ET-Flow (Hassan et al. 2024, ``shenoynikhil/ETFlow`` ``models/model.py``, ``configs/qm9-o3.yaml``) differs from plain
flow matching in three places, all here:

- **Kabsch-aligned prior samples** (``rmsd_align(x0, pos)``): each molecule's prior sample is rotated onto its data
  conformer (proper rotation, both at zero centre of mass) before interpolation. The pairing is then closer (a
  shorter, less curved path) and stays equivariant: rotating the data rotates the aligned sample with it.
- **Bridge noise**: ``x_t = (1 - t) x + t eps + sigma_t z`` with ``sigma_t = s sqrt(t (1 - t))`` (``s = 0.1``) and
  ``z`` zero-CoM Gaussian; the regression target stays ``eps - x`` as in ET-Flow (the noise regularises the field
  near the paths; the exact drift of this interpolant would add ``sigma_t' z``, singular at the ends).
- **Loss**: ``batchwise_l2_loss``: the L2 *norm* (not squared) of each atom's velocity error, averaged over the
  atoms of a molecule, then over molecules.

Time is this project's convention (t = 0 data, t = 1 noise); ET-Flow's t runs the other way, which leaves
``sqrt(t (1 - t))`` unchanged. With ``align_prior=False, bridge_noise=0, loss="mse"`` the path is
:meth:`FlowMatching.objective` itself (one time per molecule, per-molecule mean MSE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from unirep.flow import FlowMatching, FlowSample, FlowStep, interpolate
from unirep.tokens import segment_mean, segment_sum

from .egnn import remove_mean

__all__ = ["ConformerPath", "batchwise_l2_loss", "bridge_std", "kabsch_align", "kabsch_rotations"]


def kabsch_rotations(x0: Tensor, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Per graph, the proper rotation ``R[B, 3, 3]`` minimising ``sum_i |R x0_i - x_i|^2`` (both centred first).

    Kabsch's algorithm: ``H = sum_i x0_i x_i^T = U S V^T``, ``R = V diag(1, 1, d) U^T`` with ``d = sign(det(V U^T))``
    so that R is a rotation, never a reflection (a reflection would change the prior's chirality pairing).
    """
    a = remove_mean(x0, batch, num_graphs).double()
    b = remove_mean(x, batch, num_graphs).double()
    h = segment_sum(a[:, :, None] * b[:, None, :], batch, num_graphs)  # [B, 3, 3]
    u, _, vh = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vh.transpose(1, 2) @ u.transpose(1, 2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(num_graphs, 3, dtype=h.dtype, device=h.device)
    diag[:, 2] = d
    r = vh.transpose(1, 2) @ torch.diag_embed(diag) @ u.transpose(1, 2)  # [B, 3, 3]
    return r.to(x0.dtype)


def kabsch_align(x0: Tensor, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """``x0`` (zero CoM per graph) rotated onto ``x`` per graph: ET-Flow's ``rmsd_align(x0, pos)``."""
    r = kabsch_rotations(x0, x, batch, num_graphs)
    x0c = remove_mean(x0, batch, num_graphs)
    return torch.einsum("nij,nj->ni", r[batch], x0c)


def bridge_std(t: Tensor, scale: float = 0.1) -> Tensor:
    """``sigma_t = scale * sqrt(t (1 - t))``: zero at data and prior, largest (``scale / 2``) at t = 1/2."""
    return scale * (t * (1.0 - t)).clamp_min(0.0).sqrt()


def batchwise_l2_loss(pred: Tensor, target: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """ET-Flow's loss: per-atom L2 norm of the error ``[T]``, mean per molecule ``[B]``, mean over molecules."""
    acc = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    # a tiny floor keeps the norm's gradient finite where the error is exactly zero
    err = ((pred.to(acc) - target.to(acc)) ** 2).sum(-1).add(1e-12).sqrt()  # [T]
    return segment_mean(err, batch, num_graphs).mean()


class ConformerPath:
    """Time sampling and interpolant (``unirep.flow.FlowMatching``) plus ET-Flow's alignment, bridge noise and loss.

    Args:
        flow: the core :class:`FlowMatching` (time distribution and shift); velocity prediction only.
        align_prior: rotate each prior sample onto its data conformer (Kabsch) before interpolation.
        bridge_noise: ``s`` of ``sigma_t = s sqrt(t (1 - t))``; 0 turns the noise off.
        loss: ``"l2"`` (ET-Flow's ``batchwise_l2_loss``) or ``"mse"`` (``FlowMatching``'s per-molecule mean MSE).
    """

    def __init__(
        self, flow: FlowMatching | None = None, align_prior: bool = True, bridge_noise: float = 0.1, loss: str = "l2"
    ):
        if loss not in ("l2", "mse"):
            raise ValueError(f"unknown conformer loss {loss!r}: use 'l2' (ET-Flow's batchwise L2 norm) or 'mse'")
        if bridge_noise < 0:
            raise ValueError(f"bridge_noise must be >= 0, got {bridge_noise}")
        self.flow = flow if flow is not None else FlowMatching()
        if self.flow.prediction != "velocity":
            raise ValueError("ConformerPath needs a velocity-predicting FlowMatching (prediction='velocity')")
        self.align_prior, self.bridge_noise, self.loss_kind = bool(align_prior), float(bridge_noise), loss

    @property
    def is_plain(self) -> bool:
        """True when the path is plain flow matching (no alignment, no noise, MSE): FlowMatching.objective itself."""
        return not self.align_prior and self.bridge_noise == 0.0 and self.loss_kind == "mse"

    def prepare_noise(self, x: Tensor, eps: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """The prior sample paired with ``x``: Kabsch-aligned onto it when ``align_prior``."""
        return kabsch_align(eps, x, batch, num_graphs) if self.align_prior else eps

    def draw(
        self, x: Tensor, eps: Tensor, batch: Tensor, num_graphs: int, generator: torch.Generator | None = None
    ) -> FlowSample:
        """One training draw (``FlowMatching.draw``) with the aligned prior and the bridge noise added to ``x_t``."""
        eps = self.prepare_noise(x, eps, batch, num_graphs)
        sample = self.flow.draw(x, eps=eps, batch=batch, num_items=num_graphs, generator=generator)
        if self.bridge_noise > 0:
            if generator is None:
                z = torch.randn_like(x)
            else:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
            z = remove_mean(z, batch, num_graphs)  # isotropic and zero-CoM: the path stays equivariant
            sigma = bridge_std(sample.t_in, self.bridge_noise).to(x.dtype)[:, None]
            sample.x_t = interpolate(x, eps, sample.t_in) + sigma * z
        return sample

    def loss(self, pred: Tensor, sample: FlowSample) -> Tensor:
        if self.loss_kind == "l2":
            return batchwise_l2_loss(pred, sample.target, sample.batch, sample.n)
        return self.flow.loss(pred, sample.target, batch=sample.batch, num_items=sample.n)

    def objective(
        self,
        x: Tensor,
        model_fn: Callable[[FlowSample], Any],
        eps: Tensor,
        batch: Tensor,
        num_graphs: int,
        generator: torch.Generator | None = None,
    ) -> FlowStep:
        """The training objective: ``FlowMatching.objective`` when the path is plain, else draw -> model -> loss."""
        if self.is_plain:
            return self.flow.objective(x, model_fn, eps=eps, batch=batch, num_items=num_graphs, generator=generator)
        sample = self.draw(x, eps, batch, num_graphs, generator)
        out = model_fn(sample)
        pred, aux = out if isinstance(out, tuple) else (out, None)
        return FlowStep(loss=self.loss(pred, sample), pred=pred, aux=aux, sample=sample)

    def __repr__(self) -> str:
        return (
            f"ConformerPath(time_dist={self.flow.time_dist!r}, shift={self.flow.shift}, "
            f"align_prior={self.align_prior}, bridge_noise={self.bridge_noise}, loss={self.loss_kind!r})"
        )
