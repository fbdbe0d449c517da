"""Equivariant latent flow: joint flow matching on coordinates and per-atom latents of the local autoencoder.

GeoLDM (Xu et al. 2023, "Geometric Latent Diffusion Models for 3D Molecule Generation", ``MinkaiXu/GeoLDM``)
diffuses a point cloud whose points carry equivariant coordinates and invariant latent features from an
autoencoder; La-Proteina (NVIDIA 2025) does the same with per-residue latents next to explicit backbone
coordinates ("partially latent" flow matching). Here the latents are the local autoencoder's per-atom codes
(:mod:`molecular.tokenizers.local_ae`, frozen, normalised with its fitted statistics), the coordinates keep zero
centre of mass, and one E(3)-equivariant network (:class:`EquivariantVelocityNet` with ``latent_dim > 0``) predicts
both velocities: equivariant for coordinates, invariant for latents. The molecular graph stays the conditioning,
as in the conformer task, so evaluation is the same COV/MAT protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unirep.flow import flow_matching_loss, interpolate, sample_time, shift_time

from ..tokenizers.local_ae import LocalAtomicAutoencoder
from .egnn import EquivariantVelocityNet, remove_mean
from .task import ConformerFlowTask

__all__ = ["LatentFlowTask", "load_tokenizer"]


def load_tokenizer(
    checkpoint: str | None, ema: bool = True, random_init: bool = False, latent_dim: int = 8
) -> LocalAtomicAutoencoder:
    """The autoencoder of a ``molecular/local_ae`` run (``unirep.train.load_task``; nothing is unpickled).

    ``random_init=True`` (smoke runs only) returns an untrained ``local_ae_tiny`` with ``latent_dim`` channels instead.
    """
    if random_init:
        from ..tokenizers.local_ae import local_ae_tiny

        return local_ae_tiny(latent_dim=latent_dim)
    from unirep.train import find_checkpoint, load_task

    if checkpoint is None or find_checkpoint(checkpoint) is None:
        raise FileNotFoundError(
            f"no local autoencoder checkpoint at {checkpoint!r}: train one first with "
            "`unirep-train experiment=molecular/local_ae` and pass task.tokenizer.checkpoint=<its out_dir>"
        )
    task, _ = load_task(checkpoint, ema=ema)
    model = task.model
    if not isinstance(model, LocalAtomicAutoencoder):
        raise ValueError(
            f"checkpoint {checkpoint!r} holds a {type(model).__name__}, not a LocalAtomicAutoencoder: "
            "give the checkpoint of a molecular/local_ae run"
        )
    return model


class LatentFlowTask(ConformerFlowTask):
    """Conformer flow with per-atom autoencoder latents flowing jointly with the coordinates.

    Args:
        model: :class:`EquivariantVelocityNet` with ``latent_dim`` equal to the tokenizer's.
        tokenizer: the frozen :class:`LocalAtomicAutoencoder` (a built part; :func:`load_tokenizer` in configs).
        latent_weight: weight of the latent flow-matching loss.
        other arguments: as :class:`ConformerFlowTask`.
    """

    def __init__(
        self, model: EquivariantVelocityNet, tokenizer: LocalAtomicAutoencoder, latent_weight: float = 1.0, **kwargs
    ):
        if kwargs.get("teacher") is not None:
            raise ValueError("LatentFlowTask does not take a teacher: use molecular/conformer_repa for alignment")
        super().__init__(model, **kwargs)
        if tokenizer.latent_dim != model.latent_dim:
            raise ValueError(
                f"velocity network latent_dim={model.latent_dim} but the autoencoder's latent has "
                f"{tokenizer.latent_dim} channels: set task.model.latent_dim={tokenizer.latent_dim}"
            )
        tokenizer.requires_grad_(False)
        tokenizer.eval()
        self.tokenizer = tokenizer
        self.latent_weight = latent_weight
        # whether the tokenizer's latent statistics are set (fitted here on the first batch when they are not)
        self.register_buffer(
            "stats_ready", torch.tensor(bool((tokenizer.latent_std != 1).any() or (tokenizer.latent_mean != 0).any()))
        )

    def train(self, mode: bool = True) -> LatentFlowTask:
        super().train(mode)
        self.tokenizer.eval()  # frozen
        return self

    @torch.no_grad()
    def latents(self, batch) -> Tensor:
        """Normalised per-atom latents of the clean structures ``[T, L]``."""
        if not bool(self.stats_ready):
            self.tokenizer.fit_statistics([batch])
            self.stats_ready.fill_(True)
        return self.tokenizer.encode(batch).to(batch.positions.dtype)

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        bidx, n_graphs = batch.batch, batch.num_graphs
        x = remove_mean(batch.positions, bidx, n_graphs)
        z = self.latents(batch)
        eps = self.prior.sample(batch, dtype=x.dtype)
        eps_z = torch.randn_like(z)
        t = sample_time(n_graphs, self.time_dist, self.time_mean, self.time_std, device=x.device)
        if self.time_shift != 1.0:
            t = shift_time(t, self.time_shift)
        t_atom = t[bidx]
        v, v_z, _ = self.model.forward_intermediates(
            batch, interpolate(x, eps, t_atom), t_atom, interpolate(z, eps_z, t_atom)
        )
        loss_x = flow_matching_loss(v, x, eps)
        loss_z = flow_matching_loss(v_z, z, eps_z)
        return {
            "loss": loss_x + self.latent_weight * loss_z,
            "loss/flow": loss_x.detach(),
            "loss/latent": loss_z.detach(),
        }

    # joint state [T, 3 + L]: coordinates then latents
    def _initial_state(self, batch, generator: torch.Generator) -> Tensor:
        x1 = self.prior.sample(batch, generator=generator, dtype=torch.float32)
        z1 = torch.randn(x1.shape[0], self.tokenizer.latent_dim, generator=generator).to(x1.device)
        return torch.cat([x1, z1], dim=1)

    def _velocity_fn(self, batch) -> Callable[[Tensor, Tensor], Tensor]:
        def fn(s: Tensor, t: Tensor) -> Tensor:
            v, v_z = self.model(batch, s[:, :3], t, s[:, 3:])
            return torch.cat([v, v_z], dim=1)

        return fn

    def extra_repr(self) -> str:
        return f"latent_dim={self.tokenizer.latent_dim}, latent_weight={self.latent_weight}"
